"""BM25 in compact numpy arrays: Lucene's variant, scored as bm25s scores it, on bm25s's tokenizer.

Why not bm25s's own index and top k: at MS MARCO's size both break. Its tokenizer hands the index one
Python list per passage (6 GiB for 8.8M short synthetic passages, about three times that for the real
text), and its numpy top k is an `argpartition` over all 8.8M scores per query, about 1 s each when most
scores tie at zero. Here passages are tokenized a chunk at a time into int32 arrays, the term-major score
matrix is filled term by term, and a query's top k is taken among the passages that hold one of its terms.

    weight(t, d) = idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avg|d|)),  idf(t) = log(1 + (N - df + .5) / (df + .5))

A query's score for a passage is the sum of its terms' weights (a repeated term counts each time).
"""
from itertools import chain

import numpy as np

from reprolib.progress import tqdm

CHUNK = 100_000   # passages tokenized at a time: their token lists are the only Python objects held


class BM25Index:
    """Postings of each term (`indptr` into `docs` and `weights`, docs ascending) and the tokenizer that made them."""

    def __init__(self, tokenizer, indptr, docs, weights, num_docs):
        self.tokenizer, self.indptr, self.docs, self.weights, self.num_docs = tokenizer, indptr, docs, weights, num_docs

    @classmethod
    def build(cls, texts, num_docs, k1=1.5, b=0.75, stopwords="en", progress=True):
        """Index `num_docs` passages from the iterable `texts`."""
        import bm25s

        tokenizer = bm25s.tokenization.Tokenizer(stopwords=stopwords, stemmer=None)
        lengths = np.zeros(num_docs, dtype=np.int32)
        chunks = []   # per chunk: (doc, term, tf) of each distinct term of each passage, by doc then term
        texts = iter(texts)
        with tqdm(total=num_docs, desc="BM25 index", unit=" passages", disable=not progress) as bar:
            for start in range(0, num_docs, CHUNK):
                size = min(CHUNK, num_docs - start)
                token_lists = list(tokenizer.streaming_tokenize((next(texts) for _ in range(size)), update_vocab=True))
                chunk_lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=size)
                terms = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=int(chunk_lengths.sum()))
                del token_lists
                lengths[start:start + size] = chunk_lengths
                doc = np.repeat(np.arange(start, start + size, dtype=np.int64), chunk_lengths)
                pairs, tf = np.unique((doc << 32) | terms, return_counts=True)
                chunks.append(((pairs >> 32).astype(np.int32), (pairs & 0xFFFFFFFF).astype(np.int32),
                               tf.astype(np.float32)))
                bar.update(size)

        vocab_size = len(tokenizer.get_vocab_dict())
        df = sum(np.bincount(term, minlength=vocab_size) for _, term, _ in chunks)
        idf = np.log(1 + (num_docs - df + 0.5) / (df + 0.5))
        norm = k1 * (1 - b + b * lengths / lengths.mean())   # per passage
        indptr = np.zeros(vocab_size + 1, dtype=np.int64)
        np.cumsum(df, out=indptr[1:])
        docs = np.empty(indptr[-1], dtype=np.int32)
        weights = np.empty(indptr[-1], dtype=np.float32)
        filled = indptr[:-1].copy()   # where each term's next posting goes: chunks come in doc order
        while chunks:
            doc, term, tf = chunks.pop(0)
            order = np.argsort(term, kind="stable")   # by term, docs still ascending within one
            doc, term, tf = doc[order], term[order], tf[order]
            counts = np.bincount(term, minlength=vocab_size)
            first = np.cumsum(counts) - counts   # where each term's run starts in this chunk
            slot = filled[term] + np.arange(len(term)) - first[term]
            docs[slot] = doc
            weights[slot] = idf[term] * tf / (tf + norm[doc])
            filled += counts
        return cls(tokenizer, indptr, docs, weights, num_docs)

    def query_terms(self, texts):
        """Each text's term ids; words the corpus never had, and stopwords, are left out."""
        empty = self.tokenizer.get_vocab_dict().get("")   # bm25s's stand-in for a text without terms
        return [[t for t in ids if t != empty]
                for ids in self.tokenizer.streaming_tokenize(texts, update_vocab=False)]

    def top_k(self, terms, k):
        """(positions, scores) of the `k` best passages holding one of the term ids `terms`, best first
        (ties within the k by position; which of several passages tied at the k-th score make the cut is numpy's
        argpartition's choice, the same on every run); fewer when fewer passages match."""
        if not terms:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        postings = [slice(self.indptr[t], self.indptr[t + 1]) for t in terms]
        if len(postings) == 1:
            candidates, scores = self.docs[postings[0]], self.weights[postings[0]]
        else:
            total = np.zeros(self.num_docs, dtype=np.float32)
            for p in postings:   # a term's postings hold each passage once, so += is exact
                total[self.docs[p]] += self.weights[p]
            candidates = np.flatnonzero(total)   # every weight is > 0: the passages that hold a term
            scores = total[candidates]
        if len(candidates) > k:
            keep = np.argpartition(-scores, k - 1)[:k]
            candidates, scores = candidates[keep], scores[keep]
        order = np.lexsort((candidates, -scores))
        return candidates[order].astype(np.int64), scores[order]
