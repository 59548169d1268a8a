"""Training groups for contrastive fine-tuning: one query, one positive, G-1 negatives.

A group is laid out [p+, n1 .. n_{G-1}]; a batch concatenates the groups of its queries, so query
i's positive is passage row i*G (what `reprolib.losses.contrastive_loss` expects).

Two samplers, as the recipes do it (docs/recipes.md §1.5, §2.3, §3, §5):

* "retromae" (RetroMAE, Disentangled): one example per qrels row (RetroMAE) or per query
  (Disentangled, `per_query=True`); the positive is drawn uniformly; the negatives are drawn
  without replacement from the first `sample_neg_from_topk` negatives of the query; when fewer than
  G-1 are available, all of them are used and the shortfall is drawn uniformly from the corpus.

A query with no negatives at all is trained on corpus-random ones (`without_negatives="random"`, RetroMAE)
or not trained (`"skip"`: OpenMatch, LexMAE and Tevatron's HF set train only the queries of their negatives
file; docs/recipes.md correction 6).
* "tevatron" (Tevatron v1, OpenMatch's mapping dataset): one example per query; seeded by
  (index + seed), the positive is positives[(seed + epoch) % n], and the negatives are a fixed
  shuffle of the list walked as a window that moves by G-1 each epoch; `random.choices` when the
  query has fewer than G-1.

Every draw is a function of (seed, epoch, example index), so an epoch's groups are the same on
every process and after a resume.

With teacher scores (distillation), a group also carries the teacher's score of each of its passages, so
every passage must have one: the caller keeps only scored positives and negatives, and a query with
fewer than G-1 scored negatives repeats them instead of drawing unscored corpus passages.
"""
import random
from typing import NamedTuple

import numpy as np

from reprolib.data.templates import get_template
from reprolib.errors import ReprolibError

SAMPLERS = ("retromae", "tevatron")
WITHOUT_NEGATIVES = ("random", "skip")


class Group(NamedTuple):
    """One training example: a query and its G passages, the positive first."""
    query: str
    texts: list                  # the G passages as the encoder reads them (template applied)
    positions: list              # their corpus positions
    positives: list              # the corpus positions of every positive of the query (false-negative masking)
    teacher: list | None = None  # the teacher's score of each of the G passages (distillation)


class TrainGroups:
    """`groups[i]` -> a Group of G passages (with the teacher's scores when `teacher` is given).

    queries: {qid: text}; qrels: {qid: {pid: rel}} (rel > 0 counts as positive);
    negatives: {qid: [pid, ...]} in rank order, or {qid: array of corpus positions} (`negative_positions`, for
    files too large to hold as ids); a query without any: see `without_negatives`. A list of such mappings trains
    each query once per mapping and epoch, as Tevatron's stage 2 reads its mined groups beside its BM25 ones (with
    `without_negatives="skip"` a query trains once per mapping that lists it, as there);
    teacher: {qid: {pid: score}}, or {qid: (corpus positions, scores)} (`teacher_table`), covering every
    positive and negative (queries without a scored negative are skipped).
    """

    def __init__(self, corpus, queries, qrels, negatives, group_size=8, sampler="retromae",
                 sample_neg_from_topk=200, per_query=None, template="plain", sep="[SEP]", seed=42, teacher=None,
                 without_negatives="random"):
        if sampler not in SAMPLERS:
            raise ReprolibError(f"unknown negative sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if without_negatives not in WITHOUT_NEGATIVES:
            raise ReprolibError(f"without_negatives must be one of {', '.join(WITHOUT_NEGATIVES)}, "
                                f"not {without_negatives!r}")
        if group_size < 1:
            raise ReprolibError(f"group_size must be at least 1, not {group_size}")
        self.corpus = corpus
        self.group_size = int(group_size)
        self.sampler = sampler
        self.topk = int(sample_neg_from_topk)
        self.template = get_template(template)
        self.sep = sep
        self.seed = int(seed)
        self.epoch = 0
        self.teacher = None if teacher is None else {
            qid: scored if isinstance(scored, tuple) else _compact_scores(scored, corpus)
            for qid, scored in teacher.items() if qid in qrels}
        per_query = sampler == "tevatron" if per_query is None else per_query

        self.queries = []     # (qid, text, positive positions, negative positions)
        self.examples = []    # (query index, positive positions drawn from)
        skipped = {}   # qid -> None: an ordered set; a query skipped by one source may train with another
        judged_positives = {}   # qid -> corpus positions of its positives, looked up once for every source
        for qid, judged in qrels.items():
            if qid in queries:
                pids = [pid for pid, rel in judged.items() if rel > 0]
                judged_positives[qid] = [int(p) for p in corpus.positions(pids) if p >= 0]
        for source in negatives if isinstance(negatives, list) else [negatives]:
            for qid, positives in judged_positives.items():
                if not positives:
                    skipped[qid] = None
                    continue
                ranked = source.get(qid, [])
                ranked = ranked if isinstance(ranked, np.ndarray) else corpus.positions(ranked)
                # int32 arrays: MS MARCO's 80M negatives take 320 MB, against ~3 GB as lists of ints
                ranked = ranked[(ranked >= 0) & ~np.isin(ranked, positives)].astype(np.int32)
                if not len(ranked) and (teacher is not None or without_negatives == "skip"):
                    skipped[qid] = None
                    continue
                index = len(self.queries)
                self.queries.append((qid, queries[qid], positives, ranked))
                if per_query:
                    self.examples.append((index, positives))
                else:
                    self.examples.extend((index, [p]) for p in positives)
        if not self.examples:
            also = " and a negative (without_negatives: skip)" if without_negatives == "skip" else ""
            raise ReprolibError(f"no training examples: no judged query has its text and a positive in the corpus{also}")
        trained = {query[0] for query in self.queries}
        self.skipped_queries = [qid for qid in skipped if qid not in trained]

    def __len__(self):
        return len(self.examples)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def passage_text(self, position):
        return self.template.render(self.corpus.title(position), self.corpus.text(position), sep=self.sep)

    def __getitem__(self, i):
        query_index, positives = self.examples[i]
        qid, query, all_positives, negatives = self.queries[query_index]
        negatives = negatives.tolist()
        if self.sampler == "retromae":
            positive, chosen = self._retromae(i, positives, negatives, all_positives)
        else:
            positive, chosen = self._tevatron(i, positives, negatives, all_positives)
        positions = [positive] + chosen
        scores = None
        if self.teacher is not None:
            scored, values = self.teacher[qid]
            lookup = dict(zip(scored.tolist(), values.tolist()))
            scores = [lookup[p] for p in positions]
        return Group(query, [self.passage_text(p) for p in positions], positions, all_positives, scores)

    def _retromae(self, i, positives, negatives, all_positives):
        rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
        positive = rng.choice(positives)
        need = self.group_size - 1
        pool = negatives[:self.topk]
        if len(pool) < need:
            if self.teacher is not None:   # corpus passages have no teacher score: repeat the scored ones
                return positive, pool + rng.choices(pool, k=need - len(pool))
            return positive, pool + self._random_negatives(rng, need - len(pool), all_positives)
        return positive, rng.sample(pool, need)

    def _tevatron(self, i, positives, negatives, all_positives):
        hashed_seed = i + self.seed
        positive = positives[(hashed_seed + self.epoch) % len(positives)]
        need = self.group_size - 1
        if need == 0:
            return positive, []
        rng = random.Random(hashed_seed)
        if not negatives:
            return positive, self._random_negatives(rng, need, all_positives)
        if len(negatives) < need:
            return positive, rng.choices(negatives, k=need)
        shuffled = list(negatives)
        rng.shuffle(shuffled)
        offset = self.epoch * need % len(shuffled)
        return positive, (shuffled * 2)[offset:offset + need]

    def _random_negatives(self, rng, count, exclude):
        if len(self.corpus) <= len(exclude):
            raise ReprolibError(f"the corpus has no passage that is not a positive; cannot draw {count} negatives")
        out = []
        while len(out) < count:
            p = rng.randrange(len(self.corpus))
            if p not in exclude:
                out.append(p)
        return out


def negative_positions(path, corpus, qids=None):
    """{qid: int32 array of corpus positions} of a negatives file (`qid \\t pid,pid,...`), read line by line and
    kept compact: MS MARCO's 400k lines of 200 ids would take ~5 GB as id strings. Ids the corpus lacks are
    dropped; with `qids`, only those queries are kept."""
    from reprolib.data.formats import iter_negatives

    table = {}
    for qid, pids in iter_negatives(path):
        if qids is None or qid in qids:
            positions = corpus.positions(pids)
            table[qid] = positions[positions >= 0].astype(np.int32)
    return table


def teacher_table(path, corpus, qids=None):
    """{qid: (int32 corpus positions, float32 scores)} of a teacher-scores file, in its order: `qid pid score`
    text or sentence-transformers' pickle, read query by query and kept compact (MS MARCO's 160M scores: 1.3 GB,
    against ~15 GB as a dict of dicts). Passages the corpus lacks are dropped; with `qids`, only those queries.
    A pickle holding other objects than ints, strings and floats (numpy scalars) is loaded whole."""
    from reprolib.data.formats import (NotGrouped, _Unsupported, iter_scores, iter_scores_pickle, load_scores_pickle,
                                       read_scores)

    table = {}

    def add(rows):
        for qid, hits in rows:
            qid = str(qid)
            if qids is None or qid in qids:
                table[qid] = _compact_scores(hits, corpus)

    if not str(path).endswith((".pkl", ".pkl.gz")):
        try:
            add(iter_scores(path))
        except NotGrouped:   # a query's lines listed apart: read the file whole
            table.clear()
            add(read_scores(path).items())
        return table
    try:
        add(iter_scores_pickle(path))
    except _Unsupported:
        table.clear()
        add(load_scores_pickle(path).items())
    return table


def _compact_scores(hits, corpus):
    """(int32 corpus positions, float32 scores) of {pid: score}, without the passages the corpus lacks."""
    positions = corpus.positions([str(pid) for pid in hits])
    keep = positions >= 0
    return positions[keep].astype(np.int32), np.fromiter(hits.values(), np.float32, len(hits))[keep]


def epoch_order(num_examples, epoch, seed):
    """The example order of an epoch: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)
