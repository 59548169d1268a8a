from pathlib import Path

import pytest

from reprolib.errors import ReprolibError
from reprolib.metrics import evaluate, format_table, paired_test, parse_metrics

TREC_EVAL_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec_eval_test"

# trec_eval measure name -> the name we ask reprolib.metrics for
CHECKED = {"map": "map", "recip_rank": "recip_rank", "ndcg_cut_10": "ndcg_cut_10",
           "recall_1000": "recall_1000", "P_10": "P_10"}


# ---------------------------------------------------------------- trec_eval's own regression data

def _data(name):
    path = TREC_EVAL_TEST / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def _expected(name):
    """{measure: {qid: value}} from a trec_eval output file (`measure \\t qid \\t value`)."""
    table = {}
    for line in _data(name).read_text().splitlines():
        measure, qid, value = (f.strip() for f in line.split("\t"))
        table.setdefault(measure, {})[qid] = value
    return table


def _check(expected, run, qrels, denominator, per_query):
    from reprolib.data.formats import read_qrels, read_run

    qrels, run = read_qrels(qrels), read_run(run)
    names = [m for m in CHECKED if m in expected]
    assert names, "no checked measure in the expected output"
    result = evaluate(run, qrels, names, denominator=denominator)
    assert result.num_queries == int(expected["num_q"]["all"])
    checked = 0
    for name in names:
        for qid, want in expected[name].items():
            if qid != "all" and not per_query:
                continue
            got = result.aggregate[name] if qid == "all" else result.per_query[name][qid]
            assert f"{got:.4f}" == want, f"{name} {qid}: got {got:.6f}, trec_eval {want}"
            checked += 1
        if per_query:  # no extra queries on our side either
            assert set(result.per_query[name]) == set(expected[name]) - {"all"}
    return checked


def test_trec_eval_out_test():
    # trec_eval qrels.test results.test  (default measures: map, recip_rank, P_10 among them)
    assert _check(_expected("out.test"), _data("results.test"), _data("qrels.test"), "ranked", False) == 3


def test_trec_eval_out_test_with_comment_lines():
    # upstream also runs `trec_eval qrels.test.with-comments results.test` against out.test:
    # lines starting with '#' are comments, a '#' inside a doc id ("CR#93E-1860") is not
    assert _check(_expected("out.test"), _data("results.test"), _data("qrels.test.with-comments"), "ranked", False) == 3


def test_trec_eval_out_comment_test():
    # qrels.comment.test / results.comment.test: MS MARCO v2.1 segment ids that contain '#'
    # (msmarco_v2.1_doc_00_880019750#4_1633802806); no comment lines; run tag "comment.test"
    assert _check(_expected("out.comment.test"), _data("results.comment.test"), _data("qrels.comment.test"),
                  "ranked", False) == 3


def test_trec_eval_out_test_aq_per_query():
    # trec_eval -m all_trec -q qrels.test results.test
    assert _check(_expected("out.test.aq"), _data("results.test"), _data("qrels.test"), "ranked", True) == 5 * 4


def test_trec_eval_out_test_aqc_judged():
    # trec_eval -m all_trec -q -c qrels.test results.trunc: query 302 is not in the run and counts 0;
    # results.trunc also has junk after the 6th field, which trec_eval (and read_run) ignore
    assert _check(_expected("out.test.aqc"), _data("results.trunc"), _data("qrels.test"), "judged", True) == 5 * 4


def test_trec_eval_out_test_aqcM_cutoff():
    # trec_eval -m all_trec -q -c -M100 qrels.test results.trunc: recip_rank and map over the top
    # 100 hits are our RR@100 and AP@100 (same float32-score / doc-id-descending order)
    from reprolib.data.formats import read_qrels, read_run

    expected = _expected("out.test.aqcM")
    run = read_run(_data("results.trunc"))
    result = evaluate(run, read_qrels(_data("qrels.test")), "RR@100 AP@100 P@10", denominator="judged")
    for ours, theirs in (("RR@100", "recip_rank"), ("AP@100", "map"), ("P@10", "P_10")):
        for qid, want in expected[theirs].items():
            got = result.aggregate[ours] if qid == "all" else result.per_query[ours][qid]
            assert f"{got:.4f}" == want, f"{ours} {qid}: got {got:.6f}, trec_eval {theirs} {want}"


# ---------------------------------------------------------------- unit tests

QRELS = {"q1": {"a": 1, "b": 0}, "q2": {"c": 2}, "q3": {"d": 1}, "q4": {"e": 1}}
RUN = {
    "q1": {"b": 3.0, "a": 2.0, "x": 1.0},  # relevant at rank 2
    "q2": {"c": 5.0, "y": 1.0},            # relevant at rank 1
    "q3": {"z": 1.0},                      # relevant not retrieved
    "q9": {"a": 1.0},                      # not judged: ignored
}                                          # q4 judged but not ranked


def test_parse_metrics_aliases_keep_spelling():
    parsed = parse_metrics("RR@10 MRR@10 R@100 R@1000 nDCG@10 MAP AP P@10 Success@5 success@5")
    assert list(parsed) == ["RR@10", "MRR@10", "R@100", "R@1000", "nDCG@10", "MAP", "AP", "P@10",
                            "Success@5", "success@5"]
    assert parsed["MRR@10"] == parsed["RR@10"]
    assert parsed["MAP"] == parsed["AP"]
    assert parsed["success@5"] == parsed["Success@5"]
    trec = parse_metrics(["map", "recip_rank", "ndcg_cut_10", "recall_1000", "P_10", "success_5"])
    assert trec["map"] == parsed["AP"]
    assert trec["ndcg_cut_10"] == parsed["nDCG@10"]
    assert trec["recall_1000"] == parsed["R@1000"]
    assert trec["P_10"] == parsed["P@10"]
    assert trec["success_5"] == parsed["Success@5"]
    assert str(trec["recip_rank"]) == "RR"
    dotted = parse_metrics("ndcg_cut.10 recall.1000 P.10 map_cut.100")     # trec_eval -m ndcg_cut.10
    assert [dotted[n] for n in ("ndcg_cut.10", "recall.1000", "P.10")] == [parsed["nDCG@10"], parsed["R@1000"],
                                                                         parsed["P@10"]]
    assert str(dotted["map_cut.100"]) == "AP@100"


@pytest.mark.parametrize("bad", ["Foo@10", "RR@", "R", "P@0", "ndcg_cut_x", ""])
def test_parse_metrics_unknown(bad):
    with pytest.raises(ReprolibError, match="accepted forms"):
        parse_metrics([bad] if bad else [])


def test_unknown_metric_in_evaluate():
    with pytest.raises(ReprolibError, match="unknown metric 'Foo@10'.*MRR@k"):
        evaluate(RUN, QRELS, "RR@10 Foo@10")


def test_judged_vs_ranked():
    judged = evaluate(RUN, QRELS, "MRR@10 R@100 P@2", denominator="judged")
    ranked = evaluate(RUN, QRELS, "MRR@10 R@100 P@2", denominator="ranked")
    assert judged.per_query["MRR@10"] == {"q1": 0.5, "q2": 1.0, "q3": 0.0, "q4": 0.0}
    assert ranked.per_query["MRR@10"] == {"q1": 0.5, "q2": 1.0, "q3": 0.0}
    assert judged.aggregate["MRR@10"] == pytest.approx(1.5 / 4)
    assert ranked.aggregate["MRR@10"] == pytest.approx(1.5 / 3)
    assert judged.aggregate["R@100"] == pytest.approx(2 / 4)
    assert ranked.aggregate["R@100"] == pytest.approx(2 / 3)
    assert ranked.aggregate["P@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert (judged.num_queries, ranked.num_queries) == (4, 3)


def test_rr_cutoff_and_trec_tie_order():
    qrels = {"q": {"d05": 1}}
    # rank of the relevant doc is 3 -> RR@2 = 0, RR@3 = 1/3
    run = {"q": {"d01": 9.0, "d02": 8.0, "d05": 7.0}}
    r = evaluate(run, qrels, "RR@2 RR@3 RR", denominator="ranked").aggregate
    assert r == {"RR@2": 0.0, "RR@3": pytest.approx(1 / 3), "RR": pytest.approx(1 / 3)}
    # ties (also ties at float32 precision) are broken by doc id descending, like trec_eval
    tied = {"q": {"d01": 1.0, "d05": 1.0 + 1e-12, "d09": 1.0}}
    r = evaluate(tied, qrels, "RR@1 RR", denominator="ranked").aggregate
    assert r == {"RR@1": 0.0, "RR": pytest.approx(0.5)}


def test_ignore_identical_ids():
    qrels = {"q1": {"d1": 1}}
    run = {"q1": {"q1": 2.0, "d1": 1.0}}
    assert evaluate(run, qrels, "RR@10").aggregate["RR@10"] == pytest.approx(0.5)
    assert evaluate(run, qrels, "RR@10", ignore_identical_ids=True).aggregate["RR@10"] == pytest.approx(1.0)


def test_integer_ids_score_as_their_strings():
    # ids read as numbers (a user's own dict) are the same queries and passages as the files' strings
    as_text = evaluate(RUN, QRELS, "MRR@10 R@100")
    run = {int(q[1:]): {ord(p): s for p, s in hits.items()} for q, hits in RUN.items()}
    qrels = {int(q[1:]): {ord(p): r for p, r in judged.items()} for q, judged in QRELS.items()}
    as_numbers = evaluate(run, qrels, "MRR@10 R@100")
    assert as_numbers.aggregate == as_text.aggregate and as_text.aggregate["MRR@10"] > 0
    assert evaluate({1: {"1": 2.0, 5: 1.0}}, {"1": {5: 1}}, "RR@10", ignore_identical_ids=True).aggregate == \
        {"RR@10": 1.0}


def test_no_common_query():
    with pytest.raises(ReprolibError, match="share no query"):
        evaluate({"x": {"a": 1.0}}, QRELS)


def test_bad_denominator():
    with pytest.raises(ReprolibError, match="denominator"):
        evaluate(RUN, QRELS, denominator="all")


def test_paired_test_identical():
    per_query = {f"q{i}": (i % 7) / 7 for i in range(50)}
    result = paired_test(per_query, dict(per_query))
    assert result["n"] == 50
    assert result["diff"] == 0.0
    assert result["p_ttest"] == 1.0
    assert result["p_randomization"] == 1.0


def test_paired_test_different():
    import random

    rng = random.Random(1)
    a = {f"q{i}": rng.random() * 0.5 for i in range(200)}
    b = {qid: min(1.0, v + 0.1 + rng.random() * 0.05) for qid, v in a.items()}
    b["extra"] = 1.0  # only common queries are compared
    result = paired_test(a, b)
    assert result["n"] == 200
    assert result["diff"] > 0.09
    assert result["mean_b"] > result["mean_a"]
    assert result["p_ttest"] < 1e-6
    assert result["p_randomization"] == pytest.approx(1 / 10_001)
    assert result == paired_test(a, b)  # fixed seed: reproducible


def test_paired_test_no_mean_difference():
    a = {f"q{i}": i / 100 for i in range(100)}
    b = {f"q{i}": i / 100 + (0.05 if i % 2 else -0.05) for i in range(100)}  # mean difference 0
    result = paired_test(a, b)
    assert result["diff"] == pytest.approx(0.0, abs=1e-12)
    assert result["p_ttest"] == pytest.approx(1.0)
    assert result["p_randomization"] > 0.9


def test_paired_test_randomization_close_to_ttest():
    import random

    rng = random.Random(3)
    a = {f"q{i}": rng.random() for i in range(300)}
    b = {qid: min(1.0, max(0.0, v + rng.gauss(0.03, 0.2))) for qid, v in a.items()}
    result = paired_test(a, b)
    assert 0.001 < result["p_ttest"] < 0.5
    assert result["p_randomization"] == pytest.approx(result["p_ttest"], abs=0.02)


def test_format_table():
    text = format_table({"MRR@10": 0.35123, "R@1000": 0.98})
    assert text.splitlines() == ["MRR@10  0.3512", "R@1000  0.9800"]


def test_reprolib_evaluate_command_reproduces_trec_eval_all_trec(capsys):
    # the same acceptance through the CLI: `reprolib evaluate RUN QRELS --json` vs trec_eval -m all_trec
    import json

    from reprolib.cli import main

    expected = _expected("out.test.a")
    names = [m for m in CHECKED if m in expected]
    assert main(["evaluate", str(_data("results.test")), str(_data("qrels.test")), "--metrics", " ".join(names),
                 "--denominator", "ranked", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {name: f"{got[name]:.4f}" for name in names} == {name: expected[name]["all"] for name in names}
    assert len(names) == 5


def test_a_cut_run_keeps_trec_evals_top_k_through_ties():
    # Scores drawn from 5 values (many ties at the k-th place, some equal only in float32): the cut found by one
    # partition must be the first k of the full trec_eval order (float32 score desc, then doc id desc).
    import random

    from reprolib.metrics import _cut, trec_order

    rng = random.Random(0)
    values = [1.0, 0.5, 0.5 + 1e-9, 0.25, -2.0]
    run = {f"q{i}": {f"d{j}": rng.choice(values) for j in range(rng.randint(1, 60))} for i in range(200)}
    for k in (1, 3, 10, 59, 100):
        assert _cut(run, k) == {qid: dict(trec_order(hits)[:k]) for qid, hits in run.items()}, k
