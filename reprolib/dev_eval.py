"""Dev evaluation during training, to keep the best checkpoint instead of the last (docs/recipes.md correction 4).

LexMAE evaluates every 10k steps, reranking BM25's top 1,000 for the 6,980 dev queries, and mines and
predicts with the checkpoint of the best MRR@10. `DevEval` does that for any retriever the loop trains:

    rerank   with `eval_candidates` (a TREC run, e.g. BM25's on the dev queries): each query's first
             `eval_depth` candidates are scored by the current model and re-sorted;
    exact    without: the whole corpus is encoded and searched (a small corpus, or a dev subset of queries),
             each query's first `eval_depth` hits kept.

`eval_max_queries` keeps the first N dev queries (in qid order) that have judgements: the same queries at
every evaluation. The metric is computed by `reprolib.metrics.evaluate`, like every other number.
"""
from __future__ import annotations

import logging

import numpy as np

from reprolib.errors import ReprolibError

logger = logging.getLogger(__name__)


class DevEval:
    def __init__(self, config, corpus):
        from reprolib.data.formats import read_qrels, read_run
        from reprolib.data.layout import find_qrels_file, load_queries
        from reprolib.metrics import parse_metrics

        source = config.eval_data or config.train_data
        queries = load_queries(source, config.eval_split)
        qrels = read_qrels(find_qrels_file(source, config.eval_split))
        qids = sorted(q for q in queries if q in qrels)[:config.eval_max_queries or None]
        if not qids:
            raise ReprolibError(f"dev evaluation: no {config.eval_split} query of {source} has judgements")
        self.metric = next(iter(parse_metrics(config.eval_metric)))   # validated, as spelled
        self.corpus, self.template = corpus, config.template
        self.queries = {q: queries[q] for q in qids}
        self.qrels = {q: qrels[q] for q in qids}
        self.depth, self.candidates = config.eval_depth, None
        if config.eval_candidates:
            run = read_run(config.eval_candidates)
            self.candidates = {}
            for q in qids:
                ranked = sorted(run.get(q, {}).items(), key=lambda hit: -hit[1])[:config.eval_depth]
                positions = corpus.positions([pid for pid, _ in ranked])
                self.candidates[q] = [int(p) for p in positions if p >= 0]
            empty = [q for q in qids if not self.candidates[q]]
            if len(empty) == len(qids):
                raise ReprolibError(f"dev evaluation: {config.eval_candidates} ranks no passage of the corpus for "
                                    f"any {config.eval_split} query (a run of other queries?)")
            if empty:   # each scores 0, as a first stage that finds nothing would
                logger.warning("dev evaluation: %s ranks no passage for %d of the %d %s queries, e.g. %r",
                               config.eval_candidates, len(empty), len(qids), config.eval_split, empty[0])

    def __call__(self, encoder):
        """The metric of `encoder` (a DenseEncoder or SparseEncoder) on the dev queries."""
        qids = list(self.queries)
        was_training = encoder.training
        encoder.eval()
        try:
            query_vectors = encoder.encode_queries([self.queries[q] for q in qids])
            positions = (sorted({p for q in qids for p in self.candidates[q]}) if self.candidates is not None
                         else range(len(self.corpus)))
            passages = encoder.encode_passages([(self.corpus.title(p), self.corpus.text(p)) for p in positions],
                                               template=self.template)
        finally:
            encoder.train(was_training)
        scores = query_vectors @ passages.T
        scores = np.asarray(scores.todense() if hasattr(scores, "todense") else scores)
        pid_of = self.corpus.id
        run = {}
        if self.candidates is not None:
            column = {p: i for i, p in enumerate(positions)}
            for row, q in enumerate(qids):
                run[q] = {pid_of(p): float(scores[row, column[p]]) for p in self.candidates[q]}
        else:
            depth = min(self.depth, scores.shape[1])   # as deep as a rerank would score
            for row, q in enumerate(qids):
                best = np.argpartition(-scores[row], depth - 1)[:depth]
                run[q] = {pid_of(positions[i]): float(scores[row, i]) for i in best}
        from reprolib.metrics import evaluate

        return evaluate(run, self.qrels, metrics=[self.metric]).aggregate[self.metric]
