"""Retrieval into runs {qid: {pid: score}}: BM25 (reprolib.bm25), dense and sparse search over an index, fusing two
runs (hybrid retrieval), and turning runs into negatives and teacher pairs."""
import random

from reprolib.progress import tqdm

from reprolib.data.templates import get_template
from reprolib.data.formats import chunked
from reprolib.errors import ReprolibError


def bm25_search(corpus, queries, topk=1000, k1=1.5, b=0.75, stopwords="en", template="plain", batch_size=4096,
                progress=True):
    """BM25 over a `Corpus`; returns a run {qid: {pid: score}} (`bm25_index`, then `bm25_retrieve`)."""
    index = bm25_index(corpus, k1=k1, b=b, stopwords=stopwords, template=template, progress=progress)
    return bm25_retrieve(index, corpus, queries, topk=topk, batch_size=batch_size, progress=progress)


def bm25_index(corpus, k1=1.5, b=0.75, stopwords="en", template="plain", progress=True):
    """A `reprolib.bm25.BM25Index` over a `Corpus` (Lucene's BM25 on bm25s's tokenizer).

    Passages are streamed from the memory-mapped corpus and tokenized a chunk at a time, so neither the
    corpus nor its token lists are held; the index's postings are what stays in memory.
    """
    from reprolib.bm25 import BM25Index

    render = get_template(template).render
    passages = (render(corpus.title(i), corpus.text(i), sep=" ") for i in range(len(corpus)))
    return BM25Index.build(passages, len(corpus), k1=k1, b=b, stopwords=stopwords, progress=progress)


def bm25_retrieve(index, corpus, queries, topk=1000, batch_size=4096, progress=True):
    """The run {qid: {pid: score}} of `queries` ({qid: text}) over a `bm25_index` of `corpus`: only passages
    that hold a query term are hits, so a query without a known term gets none."""
    qids = list(queries)
    run = {}
    with tqdm(total=len(qids), desc="BM25 search", unit=" queries", disable=not progress or len(qids) <= batch_size) as bar:
        for batch in chunked(qids, batch_size):
            for qid, terms in zip(batch, index.query_terms([queries[q] for q in batch])):
                positions, scores = index.top_k(terms, topk)
                run[qid] = {corpus.id(int(p)): float(s) for p, s in zip(positions, scores)}
            bar.update(len(batch))
    return run


def dense_search(encoder, queries, index_dir, corpus, topk=1000, batch_size=128, max_length=None, progress=True,
                 **search_options):
    """Encode `queries` ({qid: text}) with the encoder's query tower and search the index built from `corpus`.

    `search_options` go to `reprolib.index.search` (index type, GPU use, `state` for a search split over
    processes, where the processes other than the main one get None).
    """
    from reprolib import index

    qids = list(queries)
    embeddings = encoder.encode_queries([queries[q] for q in qids], batch_size=batch_size, max_length=max_length,
                                        progress=progress)
    scores, positions = index.search(embeddings, index_dir, topk=topk, progress=progress, **search_options)
    if scores is None:   # a process other than the main one of a split search
        return None
    return index.run_from_hits(qids, scores, positions, corpus)


def sparse_search(encoder, queries, index_dir, corpus, topk=1000, quantize=False, batch_size=128, max_length=None,
                  progress=True):
    """Encode `queries` ({qid: text}) with a SparseEncoder and search the sparse index built from `corpus`:
    exact float dot products, or Anserini's integer impact scores with `quantize` (reprolib.index.search_sparse).
    """
    from reprolib import index

    qids = list(queries)
    weights = encoder.encode_queries([queries[q] for q in qids], batch_size=batch_size, max_length=max_length,
                                     progress=progress)
    scores, positions = index.search_sparse(weights, index_dir, topk=topk, quantize=quantize, progress=progress)
    return index.run_from_hits(qids, scores, positions, corpus)


def search_index(encoder, queries, index_dir, corpus, topk=1000, batch_size=128, max_length=None, progress=True,
                 quantize=False):
    """`dense_search` or `sparse_search`, whichever the index's kind calls for (`quantize`: sparse only)."""
    from reprolib.index import load_meta

    options = dict(topk=topk, batch_size=batch_size, max_length=max_length, progress=progress)
    if load_meta(index_dir)["kind"] == "sparse":
        return sparse_search(encoder, queries, index_dir, corpus, quantize=quantize, **options)
    if quantize:
        raise ReprolibError(f"{index_dir} is a dense index: quantized search is for sparse (impact) indexes")
    return dense_search(encoder, queries, index_dir, corpus, **options)


def fuse_runs(first, second, weight):
    """Hybrid retrieval: {qid: {pid: (1 - weight) * z1 + weight * z2}} over the union of each query's hits in two
    runs, where z standardizes a run's scores over the query's hits (a passage missing from one run gets that
    run's lowest z there). Queries of `first` only; a query that one run lacks or has no hits for keeps the other's
    ranking."""
    return _interpolated(_aligned(first, second), weight)


def pick_fusion_weight(first, second, qrels, weights, metric="RR@10"):
    """The weight of `second` in `fuse_runs` that scores best on `metric` over `qrels`' queries, ties to the
    smaller weight: (weight, {weight: score}). Pick it on the training queries, so that the evaluation
    queries stay unseen."""
    from reprolib.metrics import evaluate

    if not weights:
        raise ReprolibError("pick_fusion_weight: no weights to pick from")
    aligned = _aligned(first, second)   # standardized once, interpolated per weight
    by_weight = {w: evaluate(_interpolated(aligned, w), qrels, metric).aggregate[metric] for w in sorted(weights)}
    return max(by_weight, key=by_weight.get), by_weight


def _aligned(first, second):
    """{qid: (pids, z1, z2)}: the union of a query's hits (first's, then second's others, so that ties break
    the same way in every process) and both runs' standardized scores on it."""
    aligned = {}
    for qid, hits in first.items():
        other = second.get(qid) or {}
        pids = list(hits) + [pid for pid in other if pid not in hits]
        z1, z2 = _standardized(hits, pids), _standardized(other, pids)
        # a run without hits for the query (BM25 finds nothing for some): the other's ranking
        aligned[qid] = (pids, z2 if z1 is None else z1, z1 if z2 is None else z2)
    return aligned


def _standardized(hits, pids):
    """(score - mean) / sd of one query's hits, over `pids`; a pid without a hit gets the lowest. sd 1 where all
    scores tie. Empty where `pids` is; None where this run has no hits for the query (the caller takes the other's)."""
    import numpy as np

    if not pids:
        return np.zeros(0)
    if not hits:
        return None
    scores = np.fromiter(hits.values(), dtype=np.float64, count=len(hits))
    mean, sd = scores.mean(), scores.std() or 1.0
    low = scores.min()
    return (np.array([hits.get(pid, low) for pid in pids]) - mean) / sd


def _interpolated(aligned, weight):
    return {qid: dict(zip(pids, ((1 - weight) * z1 + weight * z2).tolist())) for qid, (pids, z1, z2) in aligned.items()}


def top_hits(run, depth, keep=None):
    """Each query's `depth` best hits, in rank order, then any hit ranked lower that `keep` ({qid: {pid: rel}})
    judges relevant: the pairs a teacher hands to distillation, which needs each query's positive scored."""
    top = {}
    for qid, hits in run.items():
        ranked = sorted(hits, key=lambda pid: -hits[pid])
        relevant = relevant_ids(keep or {}, qid)
        top[qid] = {pid: hits[pid] for pid in ranked[:depth] + [p for p in ranked[depth:] if p in relevant]}
    return top


def mean_margin(teacher, qrels):
    """The teacher's mean margin: its score of a judged-relevant passage minus that of another passage of the same
    query, averaged over every such pair of every query."""
    margins = []
    for qid, hits in teacher.items():
        relevant = relevant_ids(qrels, qid)
        positives = [score for pid, score in hits.items() if pid in relevant]
        negatives = [score for pid, score in hits.items() if pid not in relevant]
        margins += [p - n for p in positives for n in negatives]
    if not margins:
        raise ReprolibError("mean_margin: no query has both a judged-relevant and another scored passage")
    return sum(margins) / len(margins)


def label_scores(teacher, qrels):
    """The teacher's pairs, in its order, scored by the labels alone: a judged-relevant passage gets the teacher's
    `mean_margin` and any other passage 0. Distilled in the same loss and groups as the teacher's scores, they show
    what the teacher adds beyond the labels."""
    margin = mean_margin(teacher, qrels)
    if margin <= 0:
        raise ReprolibError(f"label_scores: the teacher scores positives below their negatives on average "
                            f"(mean margin {margin:.4g}); labels at that margin would teach the opposite")
    scores = {}
    for qid, hits in teacher.items():
        relevant = relevant_ids(qrels, qid)
        scores[qid] = {pid: margin if pid in relevant else 0.0 for pid in hits}
    return scores


def relevant_ids(qrels, qid):
    """The passages `qrels` ({qid: {pid: rel}}) judges relevant to `qid` (rel > 0; a judged 0 is a negative)."""
    return {pid for pid, rel in qrels.get(qid, {}).items() if rel > 0}


def mine_negatives(run, qrels, depth=200, num=None, shuffle_seed=None):
    """Negatives per query: the top `depth` hits minus the judged-relevant ones, in rank order.

    RetroMAE keeps that order (its trainer samples from the top of the list); Tevatron/OpenMatch's
    build_hn shuffles the kept hits and stores `num` (30) of them: give `shuffle_seed` for that.
    """
    return dict(iter_mined_negatives(run.items(), qrels, depth=depth, num=num, shuffle_seed=shuffle_seed))


def iter_mined_negatives(hits_by_query, qrels, depth=200, num=None, shuffle_seed=None):
    """`mine_negatives` one query at a time: (qid, negatives) for each (qid, {pid: score}) of `hits_by_query`
    (e.g. `iter_run`) that has any, so that a run of any size streams through."""
    for qid, hits in hits_by_query:
        positives = relevant_ids(qrels, qid)
        ranked = sorted(hits, key=lambda pid: -hits[pid])[:depth]
        kept = [pid for pid in ranked if pid not in positives]
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}/{qid}").shuffle(kept)
        kept = kept[:num] if num else kept
        if kept:
            yield qid, kept
