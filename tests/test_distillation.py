"""The cross-encoder teacher (training, scoring, reranking, the scores files) and distillation into the
bi-encoder (KL and Margin-MSE on each query's group), on hand-computed tensors and the synthetic data."""
import gzip
import math
import os
import pickle

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from reprolib.data import read_scores, write_scores  # noqa: E402
from reprolib.data.groups import TrainGroups  # noqa: E402
from reprolib.errors import DataError, ReprolibError  # noqa: E402
from reprolib.losses import cross_encoder_loss, group_scores  # noqa: E402
from reprolib.objectives import distillation_loss  # noqa: E402
from reprolib.training import TrainConfig, read_log, train  # noqa: E402
from test_training import ListCorpus, _config  # noqa: E402


# ---------------------------------------------------------------- losses on hand-computed values

def test_group_scores_take_each_querys_own_group_only():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [3.0, 0.0], [5.0, 5.0], [1.0, -1.0]])     # groups of 2
    assert group_scores(q, p, 2).tolist() == [[1.0, 3.0], [10.0, -2.0]]


def test_distillation_losses_on_a_batch_of_groups_match_hand_computed_values():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0],       # query 0: student scores 2, 1, 0
                      [0.0, 1.0], [0.0, 3.0], [0.0, -1.0]])     # query 1: student scores 1, 3, -1
    teacher = torch.tensor([[4.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
    # Margin-MSE: student margins [1, 2], [-2, 2]; teacher margins [3, 3], [2, 1] -> (4 + 1 + 16 + 1) / 4
    assert distillation_loss("margin_mse", q, p, teacher).item() == pytest.approx(22 / 4)
    # KL(teacher || student) summed over both groups, then / (B*G) for "kl" and / B for "kl_batchmean"
    total = 0.0
    for s_row, t_row in (([2, 1, 0], [4, 1, 1]), ([1, 3, -1], [2, 0, 1])):
        zs, zt = sum(math.exp(v) for v in s_row), sum(math.exp(v) for v in t_row)
        total += sum(math.exp(t) / zt * ((t - math.log(zt)) - (s - math.log(zs))) for s, t in zip(s_row, t_row))
    assert distillation_loss("kl", q, p, teacher).item() == pytest.approx(total / 6, rel=1e-5)
    assert distillation_loss("kl_batchmean", q, p, teacher).item() == pytest.approx(total / 2, rel=1e-5)
    # the temperature divides the student's scores (RetroMAE, LexMAE), never the teacher's
    halved = distillation_loss("kl", q / 2, p, teacher)
    assert distillation_loss("kl", q, p, teacher, temperature=2.0).item() == pytest.approx(halved.item(), rel=1e-6)


def test_cross_encoder_losses_match_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    listwise = sum(-(row[0] - math.log(sum(math.exp(v) for v in row))) for row in logits.tolist()) / 2
    assert cross_encoder_loss(logits).item() == pytest.approx(listwise, rel=1e-6)

    def bce(x, label):
        prob = 1 / (1 + math.exp(-x))
        return -math.log(prob if label else 1 - prob)
    pointwise = sum(bce(v, j == 0) for row in logits.tolist() for j, v in enumerate(row)) / 6
    assert cross_encoder_loss(logits, "bce").item() == pytest.approx(pointwise, rel=1e-6)
    with pytest.raises(ValueError):
        cross_encoder_loss(logits, "pairwise")


# ---------------------------------------------------------------- teacher scores files

def test_scores_text_file_round_trip_and_retromae_brackets(tmp_path):
    path = tmp_path / "scores.txt"
    path.write_text("q1 p1 [1.5]\nq1\tp2\t-0.25\nq2 p1 3\n")
    assert read_scores(path) == {"q1": {"p1": 1.5, "p2": -0.25}, "q2": {"p1": 3.0}}
    write_scores(tmp_path / "out.tsv", read_scores(path))
    assert read_scores(tmp_path / "out.tsv") == read_scores(path)


@pytest.mark.parametrize("content, problem", [
    ("q1 p1 1.0\nq1 p2\n", ":2: expected 3 fields"),
    ("q1 p1 high\n", ":1: score 'high' is not a number"),
    ("q1 p1 1\nq1 p1 2\n", ":2: duplicate score for query 'q1', doc 'p1'"),
])
def test_bad_scores_lines_are_named(tmp_path, content, problem):
    path = tmp_path / "scores.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=problem):
        read_scores(path)


def test_sentence_transformers_scores_pickle_with_int_ids_and_numpy_scores(tmp_path):
    path = tmp_path / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({1185869: {59219: np.float32(5.25), 7: -10.5}}, f)
    assert read_scores(path) == {"1185869": {"59219": 5.25, "7": -10.5}}


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_scores_pickle_refuses_anything_but_plain_data(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"q": {"p": Payload()}}))
    with pytest.raises(DataError, match="refusing to load"):
        read_scores(path)


# ---------------------------------------------------------------- groups with teacher scores

def test_groups_carry_the_teachers_score_of_every_passage_and_repeat_scored_negatives():
    corpus = ListCorpus(100)
    corpus.id = lambda i: f"p{i}"
    teacher = {"q1": {"p0": 9.0, "p10": 1.0, "p11": 2.0}, "q2": {"p2": 5.0}}
    groups = TrainGroups(corpus, {"q1": "first", "q2": "second"}, {"q1": {"p0": 1}, "q2": {"p2": 1}},
                         {"q1": ["p10", "p11"], "q2": []}, group_size=5, seed=1, teacher=teacher)
    assert groups.skipped_queries == ["q2"]          # no scored negative to distill against
    group = groups[0]
    assert group.positions[0] == 0 and set(group.positions[1:]) == {10, 11}     # 4 slots, only 2 scored: repeated
    assert group.teacher == [teacher["q1"][f"p{p}"] for p in group.positions]


def test_load_groups_takes_negatives_from_the_scores_when_no_file_is_given(synthetic_dir, tmp_path):
    from reprolib.data import read_qrels
    from reprolib.objectives import load_groups

    qrels = read_qrels(synthetic_dir / "qrels.train.tsv")
    qid, judged = next(iter(qrels.items()))
    positive = next(iter(judged))
    others = _other_pids(synthetic_dir, positive, 3)
    write_scores(tmp_path / "t.tsv", {qid: {positive: 3.0, **{pid: -1.0 for pid in others}}})
    config = _config(synthetic_dir, tmp_path / "out", teacher_scores=str(tmp_path / "t.tsv"), distillation="kl")
    groups = load_groups(config, "[SEP]")
    assert len(groups) == 1 and len(groups.skipped_queries) == len(qrels) - 1     # the unscored queries
    scores = groups[0].teacher
    assert scores[0] == 3.0 and scores[1:] == [-1.0] * 3


def _other_pids(dataset_dir, exclude, count):
    from reprolib.data import Corpus

    corpus = Corpus.open(dataset_dir, progress=False)
    return [corpus.id(i) for i in range(count + 1) if corpus.id(i) != exclude][:count]


def test_distillation_options_are_checked():
    base = dict(model="m", out_dir="o", train_data="d")
    with pytest.raises(ReprolibError, match="distillation must be one of"):
        TrainConfig(**base, distillation="mse", teacher_scores="t").check()
    with pytest.raises(ReprolibError, match="go together"):
        TrainConfig(**base, distillation="kl").check()
    with pytest.raises(ReprolibError, match="not 'retromae'"):
        TrainConfig(**base, distillation="kl", teacher_scores="t", objective="retromae").check()
    with pytest.raises(ReprolibError, match="distillation reads one negatives file, not a list"):
        TrainConfig(**base, distillation="kl", teacher_scores="t", negatives=["a", "b"]).check()


# ---------------------------------------------------------------- training, scoring, reranking

@pytest.fixture(scope="module")
def cross_encoder_dir(synthetic_dir, tmp_path_factory):
    """A micro cross-encoder trained for a few steps on the synthetic groups."""
    out = tmp_path_factory.mktemp("cross_encoder")
    config = _config(synthetic_dir, out, objective="cross_encoder", pooling=None, normalize=None,
                     passage_max_len=96, max_steps=8, learning_rate=1e-3)
    summary = train(config, log=lambda *_: None)
    assert summary["objective"] == "cross_encoder"
    return out


def test_cross_encoder_trains_saves_and_scores_pairs_as_its_forward_does(cross_encoder_dir):
    from reprolib.modeling import CrossEncoder, load_encoder

    rows = read_log(cross_encoder_dir / "train_log.csv")
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    model = CrossEncoder.from_pretrained(cross_encoder_dir / "model")
    assert model.passage_max_len == 96           # kept in reprolib_encoder.json
    pairs = [("a query", "a passage about it"), ("another query", "short"), ("a query", "x " * 300)]
    scores = model.score(pairs, batch_size=2)
    batch = model.tokenizer([q for q, _ in pairs], [p for _, p in pairs], truncation=True, max_length=96,
                            padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.model(**batch).logits.squeeze(-1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ReprolibError, match="cross-encoder"):
        load_encoder(cross_encoder_dir / "model")


def test_cross_encoder_head_stays_float32_under_bf16_autocast(cross_encoder_dir):
    from reprolib.modeling import CrossEncoder
    from reprolib.modeling.encoder import autocast

    model = CrossEncoder.from_pretrained(cross_encoder_dir / "model")
    pairs = [("a query", "a passage about it"), ("another query", "short"), ("a query", "x " * 300)]
    full = model.score(pairs)
    with autocast("bf16", "cpu"):
        batch = model.tokenize(pairs, "passage")
        assert model.embed(batch).dtype == torch.float32
        half = model.score(pairs)
    assert not np.array_equal(full, half)          # the encoder did run in bf16 ...
    np.testing.assert_allclose(half, full, atol=0.05)
    # ... but the logits are not rounded to bf16's 8-bit mantissa: they keep float32 digits
    assert any(float(torch.tensor(s).bfloat16().float()) != s for s in half)


def test_exact_match_marks_the_pieces_the_two_texts_share(cross_encoder_dir):
    from reprolib.modeling import CrossEncoder

    plain = CrossEncoder.from_pretrained(cross_encoder_dir / "model")
    matched = CrossEncoder.from_pretrained(cross_encoder_dir / "model", exact_match=True)
    batch = matched.tokenize([("the red river", "a red city on the river"), ("blue", "no match here")], "passage")
    tokens = [matched.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"]]
    types = {(tok, int(t)) for tok, t in zip(tokens[0], batch["token_type_ids"][0]) if tok != "[PAD]"}
    assert types == {("[CLS]", 0), ("the", 2), ("red", 2), ("river", 2), ("[SEP]", 0),
                     ("a", 1), ("red", 3), ("city", 1), ("on", 1), ("the", 3), ("river", 3), ("[SEP]", 1)}
    assert int(batch["token_type_ids"][1].max()) == 1            # nothing shared, padding and specials never match
    assert matched.embed(batch).shape == (2,)                      # embed recomputes the same types (idempotent)
    # the new type rows start as copies of the old ones: the model scores as before until it is trained
    pairs = [("the red river", "a red city on the river"), ("a query", "a passage about it")]
    np.testing.assert_allclose(matched.score(pairs), plain.score(pairs), rtol=1e-5, atol=1e-6)


def test_exact_match_is_trained_saved_and_checked(synthetic_dir, tmp_path):
    from reprolib.modeling import CrossEncoder
    from reprolib.modeling.cross_encoder import _add_match_types

    config = _config(synthetic_dir, tmp_path, objective="cross_encoder", pooling=None, normalize=None,
                     passage_max_len=64, max_steps=2, exact_match=True)
    train(config, log=lambda *_: None)
    from transformers import AutoModel

    model = CrossEncoder.from_pretrained(tmp_path / "model")        # exact_match read from the saved config
    assert model.exact_match and model.model.config.type_vocab_size == 4
    rows = model.model.base_model.embeddings.token_type_embeddings.weight
    start = AutoModel.from_pretrained(tmp_path / "init").embeddings.token_type_embeddings.weight
    # the match rows began as copies of the segment rows; without weight decay only their gradient moves them
    assert not torch.equal(rows[2:], start)
    assert not CrossEncoder.from_pretrained(tmp_path / "model", exact_match=False).exact_match   # an explicit override
    with pytest.raises(ReprolibError, match="exact_match is a cross-encoder's input feature"):
        TrainConfig(model="m", out_dir="o", train_data="d", exact_match=True).check()
    no_types = torch.nn.Module()
    no_types.base_model = torch.nn.Module()
    with pytest.raises(ReprolibError, match="exact_match needs a BERT-style model"):
        _add_match_types(no_types)


def test_teacher_scores_resume_from_a_partial_file(cross_encoder_dir, synthetic_corpus, synthetic_dir, tmp_path):
    from reprolib.data import Corpus
    from reprolib.data.layout import load_queries
    from reprolib.modeling import CrossEncoder
    from reprolib.rerank import score_pairs, write_teacher_scores

    model = CrossEncoder.from_pretrained(cross_encoder_dir / "model")
    queries = load_queries(synthetic_dir, "dev")
    qids = list(queries)[:6]
    pairs = {qid: [synthetic_corpus.id(i) for i in range(3 * n, 3 * n + 3)] for n, qid in enumerate(qids)}
    items = list(pairs.items())
    full = score_pairs(model, pairs, synthetic_corpus, queries, progress=False)

    out = tmp_path / "scores.tsv"
    partial = tmp_path / "scores.tsv.partial"
    original = model.score

    def crash_on_third_chunk(texts, calls=[], **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(texts, **kw)

    model.score = crash_on_third_chunk
    with pytest.raises(KeyboardInterrupt):    # queries 0-3 are in the partial file, 4-5 are not
        write_teacher_scores(model, items, synthetic_corpus, queries, out, queries_per_chunk=2, progress=False)
    assert not out.exists() and len(partial.read_text().splitlines()) == 12
    partial.write_text(partial.read_text()[:-3])      # a torn last line, as a crash mid-write leaves it
    calls = []
    model.score = lambda texts, **kw: calls.append(len(texts)) or original(texts, **kw)
    written = write_teacher_scores(model, items, synthetic_corpus, queries, out, queries_per_chunk=2, progress=False)
    # queries 0-2 are kept; query 3, the file's last (which a crash may have cut short), is redone: 3-4, 5
    assert calls == [6, 3] and written == {"queries": 6, "pairs": 18}
    assert not partial.exists()
    assert [line.split("\t")[0] for line in out.read_text().splitlines()] == [q for q in qids for _ in range(3)]
    for qid in qids:
        assert read_scores(out)[qid] == pytest.approx(full[qid], rel=1e-4, abs=1e-5)
    # the same request returns the file; another one (fewer pairs, another model) is scored afresh
    calls.clear()
    assert write_teacher_scores(model, items, synthetic_corpus, queries, out, progress=False) == written
    assert calls == []
    fewer = [(qid, pids[:1]) for qid, pids in items]
    assert write_teacher_scores(model, fewer, synthetic_corpus, queries, out, progress=False)["pairs"] == 6
    assert calls == [6] and all(len(hits) == 1 for hits in read_scores(out).values())
    before = read_scores(out)
    with torch.no_grad():   # another model: its logits are the old ones + 1
        model.model.classifier.bias += 1.0
    write_teacher_scores(model, fewer, synthetic_corpus, queries, out, progress=False)
    assert calls == [6, 6]
    for qid in qids:
        assert read_scores(out)[qid] == pytest.approx({pid: s + 1 for pid, s in before[qid].items()}, abs=1e-4)
    model.passage_max_len = 8   # the same weights, pairs cut shorter: other scores, so another request
    write_teacher_scores(model, fewer, synthetic_corpus, queries, out, progress=False)
    assert calls == [6, 6, 6]
    reworded = {**queries, qids[0]: queries[qids[0]] + " please"}   # the same qids and pairs, another query text
    write_teacher_scores(model, fewer, synthetic_corpus, reworded, out, progress=False)
    assert calls == [6, 6, 6, 6]
    lines = (synthetic_dir / "corpus.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "edited.tsv").write_text(lines[0].replace("\t", "\tedited ", 1) + "".join(lines[1:]))
    edited = Corpus.open(tmp_path / "edited.tsv", progress=False)   # the same ids, one passage reworded
    write_teacher_scores(model, fewer, edited, reworded, out, progress=False)
    assert calls == [6, 6, 6, 6, 6]
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the same request scored in bf16: other last bits
        write_teacher_scores(model, fewer, edited, reworded, out, progress=False)
    assert calls == [6, 6, 6, 6, 6, 6]
    with pytest.raises(ReprolibError, match="not in the corpus"):
        score_pairs(model, {qids[0]: ["no-such-doc"]}, synthetic_corpus, queries, progress=False)
    with pytest.raises(ReprolibError, match="query id 'no-such-query' to score is not in the queries"):
        score_pairs(model, {"no-such-query": pairs[qids[0]]}, synthetic_corpus, queries, progress=False)
    with pytest.raises(ReprolibError, match="goes over its pairs twice"):   # an iterator would score nothing
        write_teacher_scores(model, iter(items), synthetic_corpus, queries, out, progress=False)


def test_teacher_pairs_read_their_candidates_query_by_query(tmp_path):
    from reprolib.rerank import TeacherPairs

    qrels = {"q1": {"p9": 1, "p8": 0}, "q2": {"p7": 1}, "q3": {"p1": 1}}
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 p1 1 0.5 t\nq1 Q0 p9 2 0.9 t\nq1 Q0 p2 3 0.7 t\nq4 Q0 p3 1 1.0 t\nq3 Q0 p5 1 2.0 t\n")
    negatives = tmp_path / "negatives.tsv"
    negatives.write_text("q3\tp5,p1,p6\nq1\tp2,p3\n")
    # judged queries in the file's order (q4 is not judged), then the judged ones it lacks, positives only
    assert list(TeacherPairs(qrels, run, depth=2)) == [("q1", ["p9", "p2"]), ("q3", ["p1", "p5"]), ("q2", ["p7"])]
    assert list(TeacherPairs(qrels, negatives, depth=2)) == [("q3", ["p1", "p5"]), ("q1", ["p9", "p2", "p3"]),
                                                            ("q2", ["p7"])]
    pairs = TeacherPairs(qrels, negatives)
    assert list(pairs) == list(pairs)          # read afresh each time: a scorer may go over it twice


def test_rerank_rescores_the_top_depth_and_teacher_pairs_put_positives_first(cross_encoder_dir, synthetic_corpus,
                                                                              synthetic_dir):
    from reprolib.data.layout import load_queries
    from reprolib.modeling import CrossEncoder
    from reprolib.rerank import TeacherPairs, rerank

    model = CrossEncoder.from_pretrained(cross_encoder_dir / "model")
    queries = load_queries(synthetic_dir, "dev")
    qid = next(iter(queries))
    run = {qid: {synthetic_corpus.id(i): float(-i) for i in range(10)}, "unknown-query": {"x": 1.0}}
    reranked = rerank(model, run, synthetic_corpus, queries, depth=4, progress=False)
    assert list(reranked) == [qid] and set(reranked[qid]) == {synthetic_corpus.id(i) for i in range(4)}

    pairs = TeacherPairs({"q": {"p9": 1, "p8": 0}}, {"q": {"p1": 0.5, "p9": 0.9, "p2": 0.7}}, depth=2)
    assert dict(pairs) == {"q": ["p9", "p2"]}
    assert dict(TeacherPairs({"q": {"p9": 1}}, {"q": ["p3", "p4", "p5"]}, depth=2)) == {"q": ["p9", "p3", "p4"]}


@pytest.mark.parametrize("kind", ["kl", "margin_mse"])
def test_distillation_training_logs_distill_plus_weighted_ranking_loss(kind, cross_encoder_dir, synthetic_corpus,
                                                                      synthetic_dir, tmp_path):
    from reprolib.data import read_negatives, read_qrels
    from reprolib.modeling import CrossEncoder
    from reprolib.data.layout import load_queries
    from reprolib.rerank import TeacherPairs, write_teacher_scores

    qrels = read_qrels(synthetic_dir / "qrels.train.tsv")
    qrels = dict(list(qrels.items())[:64])
    pairs = TeacherPairs(qrels, read_negatives(synthetic_dir / "train.negatives.tsv"), depth=6)
    teacher = tmp_path / "teacher.tsv"
    write_teacher_scores(CrossEncoder.from_pretrained(cross_encoder_dir / "model"), pairs, synthetic_corpus,
                         load_queries(synthetic_dir, "train"), teacher, progress=False)
    config = _config(synthetic_dir, tmp_path / "student", teacher_scores=str(teacher), distillation=kind,
                     contrastive_weight=0.5, max_steps=4)
    summary = train(config, log=lambda *_: None)
    assert summary["examples"] == 64
    for row in read_log(tmp_path / "student" / "train_log.csv"):
        assert row["loss"] == pytest.approx(row["distill_loss"] + 0.5 * row["ranking_loss"], rel=1e-5)
        assert row["distill_loss"] > 0
