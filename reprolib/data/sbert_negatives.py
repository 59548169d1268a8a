"""sentence-transformers' MS MARCO hard negatives (HF `sentence-transformers/msmarco-hard-negatives`)
turned into `qid \\t pid,pid,...` negatives files, in two published recipes.

Each line of `msmarco-hard-negatives.jsonl.gz` is `{"qid": int, "pos": [pid, ...], "neg": {system: [pid, ...]}}`,
each system's list holding its top 50 hits (dataset card), which the scripts cited below walk from the front.
The teacher scores live apart, in `cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz` (`{qid: {pid: logit}}`).

* `union_negatives`: Disentangled-Retriever, jingtaozhan/disentangled-retriever@c6cf916
  `examples/prepare_dataset/english-marco/prepare_marco_hardneg.py:16-23`: every system's pids together,
  minus the positives, no score filter; queries without positives are left out (line 22).
* `ce_margin_negatives`: RetroMAE's BEIR model, staoxiao/RetroMAE@ee37587
  `examples/retriever/BEIR/download_neg.py:20-54`, margin 3 and 5 negatives per system. That script reads
  the older sbert.net file whose items carry their own `ce-score` (lines 33-34, 42); with the HF file the
  score comes from the pickle, as sentence-transformers' own trainer does it (UKPLab/sentence-transformers@85ec645
  `examples/sentence_transformer/training/ms_marco/train_bi-encoder_mnrl.py:171-200`).

Both scripts collect pids in a Python set, so their output order is arbitrary; here pids keep first-seen
order (systems in file order, each in rank order). Neither trainer depends on it: Disentangled samples
3 at random, RetroMAE samples from the first 200 (`src/bi_encoder/data.py:130-135`), more than the at most
5 × 13 systems kept here.
"""
from pathlib import Path

from reprolib.data.formats import json_record, load_scores_pickle, write_negatives
from reprolib.errors import DataError
from reprolib.fileio import iter_lines

CE_MARGIN = 3.0  # download_neg.py:20
NEGATIVES_PER_SYSTEM = 5  # download_neg.py:21


def iter_hard_negatives(path):
    """Yield (line number, qid, positives, {system: pids}) per line of the jsonl(.gz), streamed."""
    seen = set()
    for number, line in iter_lines(path):
        qid, positives, systems = _parse(path, number, line)
        if qid in seen:
            raise DataError(path, number, f"duplicate query id {qid}")
        seen.add(qid)
        yield number, qid, positives, systems


def _parse(path, number, line):
    record = json_record(path, number, line)
    for name in ("qid", "pos", "neg"):
        if name not in record:
            raise DataError(path, number, f"missing field {name!r}")
    qid, positives, systems = record["qid"], record["pos"], record["neg"]
    if not _is_id(qid):
        raise DataError(path, number, f"field 'qid' must be an integer, found {qid!r:.40}")
    if not _is_id_list(positives):
        raise DataError(path, number, "field 'pos' must be a list of integer pids")
    if not (isinstance(systems, dict) and all(_is_id_list(pids) for pids in systems.values())):
        raise DataError(path, number, "field 'neg' must map system names to lists of integer pids")
    return qid, positives, systems


def _is_id(value):
    return type(value) is int  # bool is an int subclass, and never an id


def _is_id_list(value):
    return isinstance(value, list) and all(type(pid) is int for pid in value)


# ---------------------------------------------------------------------------------------------
# The two recipes, per query
# ---------------------------------------------------------------------------------------------
def union_negatives(positives, systems):
    """All systems' pids, first-seen order, minus the positives (prepare_marco_hardneg.py:19-20)."""
    if not positives:
        return []  # prepare_marco_hardneg.py:22
    union = dict.fromkeys(pid for pids in systems.values() for pid in pids)  # an ordered set
    for pid in positives:
        union.pop(pid, None)
    return list(union)


def ce_margin_negatives(positives, systems, score, margin=CE_MARGIN, per_system=NEGATIVES_PER_SYSTEM):
    """Negatives the cross-encoder scores at least `margin` below the weakest positive, the first
    `per_system` new ones of each system (download_neg.py:32-50).

    `score(pid)` is the teacher's logit for this query. Only negatives with score <= threshold pass
    (line 42 skips `> threshold`). A pid taken from an earlier system is skipped and does not count
    against the next system's cap (lines 46-48). Each system stops after its `per_system`-th new pid
    (lines 49-50): the top of its ranking, not a sample. Positives need no explicit removal (neither
    script has one): each scores at least the minimum, `margin` above the threshold (so a margin of 0 or less
    lets the weakest positive through, as it would there).
    """
    if not positives:
        return []  # train_bi-encoder_mnrl.py:171; download_neg.py:52 keeps only queries with positives
    threshold = min(score(pid) for pid in positives) - margin  # download_neg.py:34-35
    taken = {}  # an ordered set
    for pids in systems.values():  # every system, in file order (download_neg.py:39)
        added = 0
        for pid in pids:
            if pid in taken or score(pid) > threshold:
                continue
            taken[pid] = None
            added += 1
            if added == per_system:
                break
    return list(taken)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def write_union_negatives(jsonl_path, out_path):
    """Disentangled-Retriever's negatives file (their script writes pids space-separated; ours uses commas)."""
    rows = ((qid, union_negatives(positives, systems)) for _, qid, positives, systems in iter_hard_negatives(jsonl_path))
    write_negatives(out_path, _as_text(rows))


def write_ce_margin_negatives(jsonl_path, scores_path, out_path, margin=CE_MARGIN, per_system=NEGATIVES_PER_SYSTEM):
    """RetroMAE-BEIR's negatives file; a query left without negatives gets no line (download_neg.py:52).

    The scores pickle (~1 GB gzipped) is loaded once. A positive or a scanned negative without a
    score is an error naming the jsonl line: neither original runs without one (sentence-transformers'
    lookup raises KeyError, RetroMAE's records always carry their score).
    """
    table = load_scores_pickle(scores_path)
    write_negatives(out_path, _as_text(_ce_margin_rows(jsonl_path, table, scores_path, margin, per_system)))


def _ce_margin_rows(jsonl_path, table, scores_path, margin, per_system):
    for number, qid, positives, systems in iter_hard_negatives(jsonl_path):
        score = _scorer(jsonl_path, number, qid, table, scores_path)
        yield qid, ce_margin_negatives(positives, systems, score, margin, per_system)


def _scorer(path, number, qid, table, scores_path):
    """`score(pid)` for query `qid` of line `number`."""
    hits = table.get(qid, {})

    def score(pid):
        try:
            return float(hits[pid])
        except KeyError:
            raise DataError(path, number, f"query {qid}, passage {pid} has no score in {Path(scores_path).name}") from None
        except (TypeError, ValueError):
            raise DataError(scores_path, None, f"score of query {qid}, passage {pid} is not a number: {hits[pid]!r:.40}") from None
    return score


def _as_text(rows):
    for qid, pids in rows:
        yield str(qid), [str(pid) for pid in pids]
