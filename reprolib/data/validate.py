"""`reprolib data validate DIR`: read every file of a dataset and cross-check its ids."""
from pathlib import Path

from reprolib.data.corpus import Corpus
from reprolib.data.formats import (check_doc_ids, check_query_ids, chunked, drop_unknown_docs, iter_negatives,
                                   read_qrels, rewrite_qrels)
from reprolib.data.layout import available_splits, find_qrels_file, load_queries


def validate_dataset(dataset_dir, drop_missing_qrels=False):
    """Yield one summary line per file; raise DataError (file:line: problem) on the first fault."""
    dataset_dir = Path(dataset_dir)
    corpus = Corpus.open(dataset_dir)
    yield f"corpus: {len(corpus)} passages"
    for split in available_splits(dataset_dir):
        queries = load_queries(dataset_dir, split)
        qrels_path = find_qrels_file(dataset_dir, split)
        qrels = read_qrels(qrels_path)
        check_query_ids(qrels_path, qrels, queries)
        if drop_missing_qrels:
            kept, dropped = drop_unknown_docs(qrels, corpus)
            if dropped:
                rewrite_qrels(_unlinked(dataset_dir, qrels_path), kept)
            yield f"{split}: dropped {dropped} qrels rows whose doc is not in the corpus"
            qrels = kept
        check_doc_ids(qrels_path, qrels, corpus)
        yield f"{split}: {len(queries)} queries, {sum(len(j) for j in qrels.values())} qrels rows"
        negatives_path = dataset_dir / f"{split}.negatives.tsv"
        if negatives_path.is_file():
            count = 0
            for chunk in map(dict, chunked(iter_negatives(negatives_path), 10_000)):   # MS MARCO's: 80M ids in all
                check_query_ids(negatives_path, chunk, queries)
                check_doc_ids(negatives_path, chunk, corpus)
                count += len(chunk)
            yield f"{split}: negatives for {count} queries"


def _unlinked(dataset_dir, path):
    """`path`, made safe to rewrite: a dataset prepared from a local one links its files and folders (e.g.
    qrels/ -> the source's qrels/), and a rewrite through a linked folder would edit the source. Each linked
    folder on the way becomes a real folder of links; the file's own link is then replaced by the rewrite."""
    current = dataset_dir
    for part in path.relative_to(dataset_dir).parts[:-1]:
        current = current / part
        if current.is_symlink():
            target = current.resolve()
            current.unlink()
            current.mkdir()
            for entry in target.iterdir():
                (current / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return path
