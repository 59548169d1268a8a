"""Data layer: formats, dataset layouts, the memory-mapped corpus, templates, synthetic data, downloads."""
from reprolib.data.corpus import Corpus
from reprolib.data.formats import (read_hits, read_negatives, read_qrels, read_queries, read_run, read_scores,
                                   write_negatives, write_qrels, write_queries, write_run, write_scores)
from reprolib.data.layout import find_corpus_file, find_qrels_file, find_queries_file

__all__ = ["Corpus", "find_corpus_file", "find_qrels_file", "find_queries_file", "read_hits", "read_negatives",
           "read_qrels", "read_queries", "read_run", "read_scores", "write_negatives", "write_qrels", "write_queries",
           "write_run", "write_scores"]
