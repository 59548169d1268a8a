"""Cross-encoder scoring: rerank a run, and score (qid, pid) pairs into a teacher-scores file for distillation.

RetroMAE's teacher scores the training qrels pairs plus the retriever's ranked lists (docs/recipes.md §1.5);
`teacher_pairs` builds that list and `score_pairs` scores it. On MS MARCO that is ~100M pairs, so scoring
writes the finished queries to `<out>.partial` as it goes and a rerun continues from there; the file is
renamed to `out` when complete.
"""
import hashlib
import logging
import os
from pathlib import Path

from reprolib.data.formats import read_negatives, read_run, read_scores, write_scores
from reprolib.data.templates import get_template
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write, iter_lines

logger = logging.getLogger(__name__)


def read_candidates(path):
    """The passages to score per query: a TREC run ({qid: {pid: score}}) or a negatives file ({qid: [pid, ...]}),
    told apart by the first line (6 fields or 2)."""
    first = next(iter_lines(path), (0, ""))[1].split()
    return read_run(path) if len(first) >= 6 else read_negatives(path)


def teacher_pairs(qrels, candidates, depth=None):
    """{qid: [pid, ...]}: each judged query's positives, then its first `depth` candidates (a run, ranked by
    score, or negatives in file order), without duplicates."""
    pairs = {}
    for qid, judged in qrels.items():
        ranked = candidates.get(qid, [])
        if isinstance(ranked, dict):
            ranked = sorted(ranked, key=lambda pid: -ranked[pid])
        pids = [pid for pid, rel in judged.items() if rel > 0] + list(ranked[:depth])
        pairs[qid] = list(dict.fromkeys(pids))
    return pairs


def score_pairs(cross_encoder, pairs, corpus, queries, template="plain", batch_size=64, out_path=None,
                queries_per_chunk=256, progress=True):
    """{qid: {pid: logit}} of `pairs` ({qid: [pid, ...]}); `queries` is {qid: text}, `corpus` a Corpus.

    With `out_path`, the scores are also written there (`qid \\t pid \\t score`), resumably: chunks of
    `queries_per_chunk` queries are appended to `<out_path>.partial`, and a rerun skips the queries found there.
    `<out_path>.request` records what the scores are of (the model's weights, the pairs, the template): an
    output or partial file of another request is scored afresh, never returned as this one.
    """
    from reprolib.progress import tqdm

    render = get_template(template).render
    sep = cross_encoder.sep_token
    scores, partial = {}, None
    if out_path is not None:
        out_path = Path(out_path)
        partial = out_path.with_name(out_path.name + ".partial")
        request_path = out_path.with_name(out_path.name + ".request")
        request = _request_digest(cross_encoder, pairs, template)
        recorded = request_path.read_text().strip() if request_path.exists() else None
        if recorded == request and out_path.exists():
            return read_scores(out_path)
        if recorded != request:
            if out_path.exists() or partial.exists():
                logger.warning("%s was scored for another model, candidates or template: scoring afresh", out_path)
            partial.unlink(missing_ok=True)
            with atomic_write(request_path) as f:
                f.write(request + "\n")
        scores = _finished_queries(partial)
    todo = [qid for qid in pairs if qid not in scores and pairs[qid]]
    bar = tqdm(total=sum(len(pairs[q]) for q in todo), desc="cross-encoder", unit="pair", disable=not progress)
    for start in range(0, len(todo), queries_per_chunk):
        chunk = todo[start:start + queries_per_chunk]
        keys = [(qid, pid) for qid in chunk for pid in pairs[qid]]
        positions = corpus.positions([pid for _, pid in keys])
        unknown = [pid for (_, pid), position in zip(keys, positions) if position < 0]
        if unknown:
            raise ReprolibError(f"doc id {unknown[0]!r} to score is not in the corpus ({len(unknown)} unknown)")
        texts = [(queries[qid], render(corpus.title(p), corpus.text(p), sep=sep))
                 for (qid, _), p in zip(keys, positions)]
        logits = cross_encoder.score(texts, batch_size=batch_size)
        chunk_scores = {}
        for (qid, pid), logit in zip(keys, logits):
            chunk_scores.setdefault(qid, {})[pid] = float(logit)
        if partial is not None:
            _append(partial, chunk_scores)
        scores.update(chunk_scores)
        bar.update(len(keys))
    bar.close()
    if out_path is not None:
        write_scores(out_path, scores)
        partial.unlink(missing_ok=True)
    return scores


def rerank(cross_encoder, run, corpus, queries, depth=100, template="plain", batch_size=64, progress=True):
    """The top `depth` hits of each query of `run`, rescored by the cross-encoder (a run of logits)."""
    top = {qid: sorted(hits, key=lambda pid: -hits[pid])[:depth] for qid, hits in run.items() if qid in queries}
    return score_pairs(cross_encoder, top, corpus, queries, template=template, batch_size=batch_size,
                       progress=progress)


def _request_digest(cross_encoder, pairs, template):
    from reprolib.index import model_fingerprint

    digest = hashlib.sha256(f"{model_fingerprint(cross_encoder)}|{template}\n".encode())
    for qid, pids in pairs.items():
        digest.update(f"{qid}\t{','.join(pids)}\n".encode())
    return digest.hexdigest()[:16]


def _append(path, chunk_scores):
    """Append whole queries in one write, flushed to disk: a crash leaves at most a torn last query."""
    lines = "".join(f"{qid}\t{pid}\t{score:.7g}\n" for qid, hits in chunk_scores.items() for pid, score in hits.items())
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())


def _finished_queries(partial):
    """The scores of a `.partial` file, less its last query (which a crash may have cut short)."""
    if not partial.exists():
        return {}
    text = partial.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    scores, kept = {}, 0
    for line in lines:   # up to the first damaged line: what follows it is scored again
        try:
            qid, pid, score = line.rstrip("\n").split("\t")
            scores.setdefault(qid, {})[pid] = float(score)
        except ValueError:
            break
        kept += 1
    lines = lines[:kept]
    if scores:
        scores.pop(next(reversed(scores)))
    partial.write_text("".join(line for line in lines if line.split("\t", 1)[0] in scores), encoding="utf-8")
    return scores
