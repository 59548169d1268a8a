"""Cross-encoder scoring: rerank a run, and score (qid, pid) pairs into a teacher-scores file for distillation.

RetroMAE's teacher scores the training qrels pairs plus the retriever's ranked lists (docs/recipes.md §1.5):
`TeacherPairs` lists them and `write_teacher_scores` scores them into a file. On MS MARCO that is ~100M pairs, so
both go query by query: the candidates are read from their file as the scoring goes, the finished queries are
appended to `<out>.partial`, a rerun continues from there, and the file is renamed to `out` when complete.
`score_pairs` scores in memory (reranking).
"""
import hashlib
import logging
import os
from pathlib import Path

from reprolib.data.formats import chunked, iter_negatives, iter_run
from reprolib.data.templates import get_template
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write, iter_lines
from reprolib.search import top_hits

logger = logging.getLogger(__name__)


def iter_candidates(path):
    """(qid, [pid, ...]) one query at a time: a TREC run's hits ranked by score, or a negatives file's in file
    order (told apart by the first line: 6 fields or 2)."""
    first = next(iter_lines(path), (0, ""))[1].split()
    if len(first) < 6:
        yield from iter_negatives(path)
        return
    for qid, hits in iter_run(path):
        yield qid, sorted(hits, key=lambda pid: -hits[pid])


class TeacherPairs:
    """The (query, passages) pairs a teacher scores: each judged query's positives, then its first `depth`
    candidates, without duplicates. Iterating yields (qid, [pid, ...]): the judged queries of `candidates` in
    its order, then the judged queries it lacks (positives only).

    `candidates`: a TREC run or negatives file, read query by query on every iteration, so MS MARCO's 100M
    pairs are never held at once; or {qid: [pid, ...]} / {qid: {pid: score}} in memory.
    """

    def __init__(self, qrels, candidates, depth=None):
        self.qrels, self.candidates, self.depth = qrels, candidates, depth

    def __iter__(self):
        seen = set()
        for qid, ranked in self._ranked():
            judged = self.qrels.get(qid)
            if judged is not None:
                seen.add(qid)
                yield qid, list(dict.fromkeys(_positives(judged) + list(ranked[:self.depth])))
        for qid, judged in self.qrels.items():
            if qid not in seen and _positives(judged):
                yield qid, _positives(judged)

    def _ranked(self):
        if not isinstance(self.candidates, dict):
            yield from iter_candidates(self.candidates)
            return
        for qid, ranked in self.candidates.items():
            yield qid, sorted(ranked, key=lambda pid: -ranked[pid]) if isinstance(ranked, dict) else ranked


def _positives(judged):
    return [pid for pid, rel in judged.items() if rel > 0]


def score_pairs(cross_encoder, pairs, corpus, queries, template="plain", batch_size=64, queries_per_chunk=256,
                progress=True):
    """{qid: {pid: logit}} of `pairs` ({qid: [pid, ...]} or (qid, [pid, ...]) items); `queries` is {qid: text},
    `corpus` a Corpus. In memory: for a teacher's scores of a training set, `write_teacher_scores`."""
    from reprolib.progress import tqdm

    items = list(pairs.items() if isinstance(pairs, dict) else pairs)
    scores = {}
    with tqdm(total=sum(len(pids) for _, pids in items), desc="cross-encoder", unit="pair",
              disable=not progress) as bar:
        for chunk in chunked([(qid, pids) for qid, pids in items if pids], queries_per_chunk):
            scores.update(_score_chunk(cross_encoder, chunk, corpus, queries, template, batch_size))
            bar.update(sum(len(pids) for _, pids in chunk))
    return scores


def write_teacher_scores(cross_encoder, pairs, corpus, queries, out_path, template="plain", batch_size=64,
                         queries_per_chunk=256, progress=True):
    """Score `pairs` (a TeacherPairs, or anything iterable twice over (qid, [pid, ...])) into `out_path`
    (`qid \t pid \t score`), resumably and in bounded memory; returns {"queries": Q, "pairs": P} written.

    Chunks of `queries_per_chunk` queries are appended to `<out_path>.partial` as they are scored; a rerun skips
    the queries found there (less the last, which a crash may have cut short), and the finished file replaces
    `out_path` at the end. `<out_path>.request` records what the scores are of (the model's weights and settings,
    the pairs and their query texts, the corpus, the template): an output or partial file of another request is
    scored afresh, never returned as this one.
    """
    from reprolib.progress import tqdm

    if iter(pairs) is pairs:
        raise ReprolibError("write_teacher_scores goes over its pairs twice (a digest, then the scoring): give a "
                            "TeacherPairs or a list, not an iterator")
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    request_path = out_path.with_name(out_path.name + ".request")
    request, total = _request_digest(cross_encoder, pairs, template, corpus, queries)
    recorded = request_path.read_text().strip() if request_path.exists() else None
    if recorded == request and out_path.exists():
        return _count_scores(out_path)
    if recorded != request:
        if out_path.exists() or partial.exists():
            logger.warning("%s was scored for another model, precision, candidates or template: scoring afresh",
                           out_path)
        partial.unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)   # never returned as this request's, should this run stop early
        with atomic_write(request_path) as f:
            f.write(request + "\n")
    finished, done = _finished_queries(partial)
    todo = ((qid, pids) for qid, pids in pairs if pids and qid not in finished)
    with tqdm(total=total - done, desc="cross-encoder", unit="pair", disable=not progress) as bar:
        for chunk in chunked(todo, queries_per_chunk):
            chunk_scores = _score_chunk(cross_encoder, chunk, corpus, queries, template, batch_size)
            _append(partial, chunk_scores)
            bar.update(sum(len(hits) for hits in chunk_scores.values()))
    partial.touch()
    os.replace(partial, out_path)
    return _count_scores(out_path)


def _score_chunk(cross_encoder, chunk, corpus, queries, template, batch_size):
    """{qid: {pid: logit}} of one chunk of (qid, [pid, ...])."""
    render = get_template(template).render
    keys = [(qid, pid) for qid, pids in chunk for pid in pids]
    positions = corpus.positions([pid for _, pid in keys])
    unknown = [pid for (_, pid), position in zip(keys, positions) if position < 0]
    if unknown:
        raise ReprolibError(f"doc id {unknown[0]!r} to score is not in the corpus ({len(unknown)} unknown)")
    unasked = [qid for qid, _ in chunk if qid not in queries]
    if unasked:   # a qrels or run query the queries file lacks
        raise ReprolibError(f"query id {unasked[0]!r} to score is not in the queries ({len(unasked)} unknown here)")
    texts = [(queries[qid], render(corpus.title(p), corpus.text(p), sep=cross_encoder.sep_token))
             for (qid, _), p in zip(keys, positions)]
    scores = {}
    for (qid, pid), logit in zip(keys, cross_encoder.score(texts, batch_size=batch_size)):
        scores.setdefault(qid, {})[pid] = float(logit)
    return scores


def rerank(cross_encoder, run, corpus, queries, depth=100, template="plain", batch_size=64, progress=True):
    """The top `depth` hits of each query of `run` (`search.top_hits`), rescored by the cross-encoder (a run of
    logits)."""
    top = {qid: list(hits) for qid, hits in top_hits(run, depth).items() if qid in queries}
    return score_pairs(cross_encoder, top, corpus, queries, template=template, batch_size=batch_size,
                       progress=progress)


def _request_digest(cross_encoder, pairs, template, corpus, queries):
    """(digest of the model, the precision it scores in, the template, corpus and pairs with their query texts,
    number of pairs): one pass over `pairs`. The model's fingerprint covers its settings (the pair's max_len,
    exact_match) beside its weights."""
    from reprolib.index import model_fingerprint
    from reprolib.modeling.encoder import autocast_precision

    model, precision = model_fingerprint(cross_encoder), autocast_precision(getattr(cross_encoder, "device", "cpu"))
    if precision != "no":   # named only when half: a file scored in float32 before it was recorded is still this one
        model = f"{model}|{precision}"
    digest = hashlib.sha256(f"{model}|{template}|{getattr(corpus, 'fingerprint', None)}\n".encode())
    total = 0
    for qid, pids in pairs:
        digest.update(f"{qid}\t{queries.get(qid)}\t{','.join(pids)}\n".encode())
        total += len(pids)
    return digest.hexdigest()[:16], total


def _append(path, chunk_scores):
    """Append whole queries in one write, flushed to disk: a crash leaves at most a torn last query."""
    lines = "".join(f"{qid}\t{pid}\t{score:.7g}\n" for qid, hits in chunk_scores.items() for pid, score in hits.items())
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def _finished_queries(partial):
    """(the queries of a `.partial` file, their pairs), less its last query, which a crash may have cut short,
    and anything after a damaged line; the file is cut back to what is kept, so appending goes on from there."""
    if not partial.exists():
        return set(), 0
    finished, pairs, current, current_pairs, keep_bytes, offset = set(), 0, None, 0, 0, 0
    with open(partial, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b"\t")
            try:
                if not line.endswith(b"\n") or len(fields) != 3:
                    break
                float(fields[2])
            except ValueError:
                break
            qid = fields[0].decode("utf-8")
            if qid != current:
                if current is not None:
                    finished.add(current)
                    pairs += current_pairs
                current, current_pairs, keep_bytes = qid, 0, offset
            current_pairs += 1
            offset += len(line)
    os.truncate(partial, keep_bytes)
    return finished, pairs


def _count_scores(path):
    """{"queries": Q, "pairs": P} of a scores file written query by query."""
    queries, pairs, current = 0, 0, None
    with open(path, "rb") as f:
        for line in f:
            qid = line.split(b"\t", 1)[0]
            queries += qid != current
            current = qid
            pairs += 1
    return {"queries": queries, "pairs": pairs}
