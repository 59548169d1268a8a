"""Find a dataset's files in a directory, whatever layout it uses.

    MS MARCO (ours)   corpus.tsv, <split>.query.txt, qrels.<split>.tsv, <split>.negatives.tsv
    BEIR              corpus.jsonl, queries.jsonl (or queries.<split>.jsonl), qrels/<split>.tsv
    LoTTE             collection.tsv, questions.<split>.tsv, qas.<split>.jsonl  (split: search | forum)

Every function also accepts a plain file path and returns it unchanged.
"""
from pathlib import Path

from reprolib.errors import DataError

SPLIT_PREFERENCE = ("dev", "test", "search", "forum", "train")

CORPUS_NAMES = ("corpus.tsv", "corpus.jsonl", "collection.tsv", "corpus.tsv.gz", "corpus.jsonl.gz")
QUERY_PATTERNS = ("{split}.query.txt", "queries.{split}.tsv", "queries.{split}.jsonl", "questions.{split}.tsv")
QRELS_PATTERNS = ("qrels.{split}.tsv", "qrels/{split}.tsv", "qas.{split}.jsonl")


def _existing(path):
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file or directory not found")
    return path


def find_corpus_file(source):
    source = _existing(source)
    if source.is_file():
        return source
    for name in CORPUS_NAMES:
        if (source / name).is_file():
            return source / name
    raise DataError(source, None, f"no corpus file in this directory (looked for {', '.join(CORPUS_NAMES)})")


def available_splits(source):
    source = Path(source)
    return [s for s in SPLIT_PREFERENCE if any((source / p.format(split=s)).is_file() for p in QRELS_PATTERNS)]


def default_split(source):
    splits = available_splits(source)
    if not splits:
        raise DataError(source, None, "no qrels in this directory (looked for qrels.<split>.tsv, qrels/<split>.tsv, qas.<split>.jsonl)")
    return splits[0]


def find_qrels_file(source, split=None):
    source = _existing(source)
    if source.is_file():
        return source
    split = split or default_split(source)
    for pattern in QRELS_PATTERNS:
        if (source / pattern.format(split=split)).is_file():
            return source / pattern.format(split=split)
    raise DataError(source, None, f"no qrels for split {split!r} (have: {', '.join(available_splits(source)) or 'none'})")


def find_queries_file(source, split=None):
    """The split's queries file; BEIR's shared queries.jsonl when there is no per-split file."""
    source = _existing(source)
    if source.is_file():
        return source
    split = split or default_split(source)
    for pattern in QUERY_PATTERNS:
        if (source / pattern.format(split=split)).is_file():
            return source / pattern.format(split=split)
    if (source / "queries.jsonl").is_file():
        return source / "queries.jsonl"
    raise DataError(source, None, f"no queries for split {split!r} (looked for {', '.join(p.format(split=split) for p in QUERY_PATTERNS)}, queries.jsonl)")


def load_queries(source, split=None):
    """The split's queries; from a shared file (BEIR queries.jsonl), only those the split judges."""
    from reprolib.data.formats import read_qrels, read_queries

    path = find_queries_file(source, split)
    queries = read_queries(path)
    if Path(source).is_dir() and path.name == "queries.jsonl":
        judged = read_qrels(find_qrels_file(source, split))
        queries = {qid: text for qid, text in queries.items() if qid in judged}
    return queries
