"""Retrieval evaluation with trec_eval semantics, through ir_measures (pytrec_eval backend).

Ranking
    A run is `{qid: {pid: score}}`; the rank column of a TREC run file plays no part. Hits are
    ordered as trec_eval orders them: by score descending, the score first rounded to a C `float`
    (trec_eval and pytrec_eval store it as float32, so scores that differ only beyond float32
    precision tie), and ties broken by doc id in *descending* byte order. Note that MS MARCO's
    official `ms_marco_eval.py` ranks by the rank column instead, and ir_measures' own MRR
    implementation breaks ties by doc id ascending; neither is used here. `RR@k` is computed as
    trec_eval's `recip_rank` on the run cut to its top k hits in that order (which is what
    `trec_eval -M k -m recip_rank` does); every other measure goes straight to pytrec_eval.

Metric names (`parse_metrics`)
    ir_measures style, case-insensitive: `RR` / `MRR` (optionally `@k`), `AP` / `MAP` (optionally
    `@k`), `nDCG` (optionally `@k`), `R@k` (recall), `P@k`, `Success@k`; and trec_eval style:
    `map`, `map_cut_k`, `recip_rank`, `ndcg`, `ndcg_cut_k`, `recall_k`, `P_k`, `success_k`.
    Results are keyed by the name exactly as the user spelled it.

Denominator (which queries the aggregate mean runs over)
    "ranked": queries present in both the run and the qrels. This is trec_eval's default.
    "judged": every query in the qrels; a query the run does not rank scores 0 (trec_eval `-c`).
    Per-recipe choices:
      * MS MARCO passage, official MRR@10 (`ms_marco_eval.py`): divides by all qrels queries,
        i.e. "judged". RetroMAE and LexMAE report MRR@10 from that script, so "judged".
      * OpenMatch's MRR computation divides by the queries that appear in the run, i.e. "ranked".
      * trec_eval / pytrec_eval (TREC DL, BEIR's evaluation): "ranked", unless `-c` is given.
    With a complete run (every qrels query ranked) the two agree.

`ignore_identical_ids`
    Drops run hits whose doc id equals the query id before evaluation. BEIR does this by default
    (it matters for ArguAna and Quora, where queries are also corpus documents).
"""
import math
import re
from dataclasses import dataclass, field

import numpy as np

from reprolib.errors import ReprolibError

DENOMINATORS = ("ranked", "judged")

ACCEPTED_FORMS = (
    "RR, RR@k, MRR, MRR@k, AP, AP@k, MAP, MAP@k, nDCG, nDCG@k, R@k, P@k, Success@k "
    "(case-insensitive), or trec_eval names map, map_cut_k, recip_rank, ndcg, ndcg_cut_k, "
    "recall_k, P_k, success_k (also as trec_eval -m spells them: ndcg_cut.10, recall.1000)"
)

# (pattern, ir_measures measure name); group 1, where there is one, is the cutoff
_PATTERNS = [
    (r"m?rr(?:@(\d+))?", "RR"),
    (r"m?ap(?:@(\d+))?", "AP"),
    (r"ndcg(?:@(\d+))?", "nDCG"),
    (r"(?:r|recall)@(\d+)", "R"),
    (r"p@(\d+)", "P"),
    (r"success@(\d+)", "Success"),
    (r"recip_rank", "RR"),
    (r"map(?:_cut[._](\d+))?", "AP"),
    (r"ndcg(?:_cut[._](\d+))?", "nDCG"),
    (r"recall[._](\d+)", "R"),
    (r"p[._](\d+)", "P"),
    (r"success[._](\d+)", "Success"),
]


def _parse_one(name):
    import ir_measures

    for pattern, measure in _PATTERNS:
        m = re.fullmatch(pattern, name, flags=re.IGNORECASE)
        if not m:
            continue
        cutoff = m.group(1) if m.groups() else None
        if cutoff is not None:
            if int(cutoff) < 1:
                raise ReprolibError(f"metric {name!r}: the cutoff must be at least 1; accepted forms: {ACCEPTED_FORMS}")
            return ir_measures.parse_measure(f"{measure}@{int(cutoff)}")
        return ir_measures.parse_measure(measure)
    raise ReprolibError(f"unknown metric {name!r}; accepted forms: {ACCEPTED_FORMS}")


def parse_metrics(names):
    """Map each metric name (as the user spelled it) to its ir_measures measure, in order.

    `names` is a list of names or one space/comma-separated string. Duplicates are dropped.
    """
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    parsed = {}
    for name in names:
        name = str(name).strip()
        if name and name not in parsed:
            parsed[name] = _parse_one(name)
    if not parsed:
        raise ReprolibError(f"no metric given; accepted forms: {ACCEPTED_FORMS}")
    return parsed


@dataclass
class Evaluation:
    aggregate: dict  # name -> mean over the query set chosen by `denominator`
    per_query: dict  # name -> {qid: value}, over that same query set
    denominator: str = "judged"
    queries: list = field(default_factory=list)  # the query set averaged over

    @property
    def num_queries(self):
        return len(self.queries)


def trec_order(hits):
    """(pid, score) pairs of one query in trec_eval order: float32 score desc, then doc id desc."""
    return sorted(hits.items(), key=lambda hit: (np.float32(hit[1]), hit[0]), reverse=True)


def _cut(run, k):
    return {qid: dict(trec_order(_candidates(hits, k))[:k]) for qid, hits in run.items()}


def _candidates(hits, k):
    """The hits whose float32 score reaches the k-th highest (ties included): a superset of the top k found in
    one vectorized pass, so that only it is sorted."""
    if k <= 0:
        return {}
    if len(hits) <= k:
        return hits
    scores = np.fromiter(hits.values(), dtype=np.float32, count=len(hits))
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]
    items = list(hits.items())
    return dict(items[i] for i in np.flatnonzero(scores >= kth))


def _per_query(measures, qrels, run):
    """{measure: {qid: value}} via ir_measures' pytrec_eval provider."""
    import ir_measures

    provider = ir_measures.pytrec_eval
    out = {m: {} for m in measures}
    direct, rr_cut = [], []
    for m in measures:
        if m.NAME == "RR" and m["cutoff"] is not ir_measures.providers.base.NOT_PROVIDED:
            rr_cut.append(m)
        else:
            direct.append(m)
    groups = [(direct, run, {m: m for m in direct})]
    for m in rr_cut:
        groups.append(([ir_measures.RR], _cut(run, m["cutoff"]), {ir_measures.RR: m}))
    for wanted, table, rename in groups:
        if not wanted:
            continue
        # pytrec_eval cannot take a query with no hits; it is filled with 0 below anyway
        table = {qid: hits for qid, hits in table.items() if hits}
        if not table:
            continue
        for metric in provider.iter_calc(wanted, qrels, table):
            if metric.measure in rename:
                out[rename[metric.measure]][metric.query_id] = float(metric.value)
    return out


def evaluate(run, qrels, metrics="RR@10 R@1000 nDCG@10", denominator="judged", ignore_identical_ids=False):
    """Evaluate `run` ({qid: {pid: score}}) against `qrels` ({qid: {pid: int}}); see module doc."""
    if denominator not in DENOMINATORS:
        raise ReprolibError(f"unknown denominator {denominator!r}; use one of {', '.join(DENOMINATORS)}")
    names = parse_metrics(metrics)
    if not qrels:
        raise ReprolibError("the qrels are empty")
    qrels = {str(q): {str(p): int(r) for p, r in judged.items()} for q, judged in qrels.items()}
    ranked = {str(q): hits for q, hits in run.items()}   # ids given as numbers are their strings
    common = [qid for qid in qrels if qid in ranked]
    if not common:
        raise ReprolibError(
            f"the run and the qrels share no query id (run has {len(run)} queries, e.g. "
            f"{next(iter(run), None)!r}; qrels have {len(qrels)}, e.g. {next(iter(qrels))!r})"
        )
    run = {qid: {str(p): float(s) for p, s in ranked[qid].items()} for qid in common}
    if ignore_identical_ids:
        run = {qid: {pid: s for pid, s in hits.items() if pid != qid} for qid, hits in run.items()}

    queries = list(qrels) if denominator == "judged" else common
    measures = list(dict.fromkeys(names.values()))
    values = _per_query(measures, qrels, run)
    per_query, aggregate = {}, {}
    for name, measure in names.items():
        got = values[measure]
        per_query[name] = {qid: got.get(qid, 0.0) for qid in queries}
        aggregate[name] = math.fsum(per_query[name].values()) / len(queries)
    return Evaluation(aggregate, per_query, denominator, queries)


def paired_test(per_query_a, per_query_b, permutations=10_000, seed=0):
    """Compare two systems on one metric over their common queries.

    Returns n, mean_a, mean_b, diff (mean of b - a), p_ttest (scipy paired t-test) and
    p_randomization (two-sided paired sign-flip test, `permutations` random flips, fixed seed;
    p = (1 + #{|mean flipped diff| >= |observed|}) / (1 + permutations)).
    """
    from scipy import stats

    common = [qid for qid in per_query_a if qid in per_query_b]
    if len(common) < 2:
        raise ReprolibError(f"a paired test needs at least 2 common queries, found {len(common)}")
    a = np.array([per_query_a[q] for q in common], dtype=np.float64)
    b = np.array([per_query_b[q] for q in common], dtype=np.float64)
    d = b - a
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))

    if np.all(np.abs(d) <= tol):
        p_t = p_r = 1.0
    else:
        if np.ptp(d) <= tol:  # constant non-zero difference: zero variance, the t-test is certain
            p_t = 0.0
        else:
            p_t = float(stats.ttest_rel(b, a).pvalue)
        rng = np.random.default_rng(seed)
        chunk = max(1, min(permutations, 4_000_000 // len(d)))
        hits, done = 0, 0
        while done < permutations:
            size = min(chunk, permutations - done)
            signs = rng.integers(0, 2, size=(size, len(d)), dtype=np.int8) * 2 - 1
            flipped = np.abs(signs @ d) / len(d)
            hits += int(np.count_nonzero(flipped >= observed - tol))
            done += size
        p_r = (hits + 1) / (permutations + 1)
    return {
        "n": len(common),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(d.mean()),
        "p_ttest": p_t,
        "p_randomization": float(p_r),
    }


def format_table(aggregate, digits=4):
    """Aligned `name  value` lines for printing."""
    if not aggregate:
        return ""
    width = max(len(str(name)) for name in aggregate)
    return "\n".join(f"{str(name):<{width}}  {value:.{digits}f}" for name, value in aggregate.items())
