"""`reprolib data prepare NAME`: the synthetic dataset here, real datasets via downloads."""
from pathlib import Path

from reprolib.data import msmarco_scale, synthetic
from reprolib.data.corpus import Corpus
from reprolib.data.formats import read_qrels, read_queries, write_negatives
from reprolib.data.prepare_remote import REMOTE_NAMES, UnknownDataset
from reprolib.data.prepare_remote import prepare as prepare_remote
from reprolib.errors import ReprolibError
from reprolib.search import bm25_search, mine_negatives


def prepare(name, out_dir, progress=True, **options):
    """`name`: "synthetic", a dataset to download (see prepare_remote), or a local dataset directory."""
    if name == "synthetic":
        return prepare_synthetic(out_dir, progress=progress, **options)
    if name == "synthetic-msmarco":   # MS MARCO's sizes, for rehearsing the recipes' data paths
        return msmarco_scale.generate(out_dir, progress=progress, **options)
    if Path(name).is_dir():
        return link_local(name, out_dir)
    try:
        return prepare_remote(name, out_dir, progress=progress, **options)
    except UnknownDataset:
        raise UnknownDataset(f"unknown dataset {name!r}: expected synthetic, synthetic-msmarco, a dataset directory, "
                             f"{REMOTE_NAMES}") from None


def link_local(source, out_dir):
    """Symlink the files of a dataset directory (any layout) into `out_dir`: a pipeline's data stage
    over data already on disk, such as ../shared/data/beir/scifact, without copying it."""
    from reprolib.data.layout import find_corpus_file

    source, out_dir = Path(source).resolve(), Path(out_dir)
    find_corpus_file(source)  # fails early, naming the directory, when there is no corpus
    out_dir.mkdir(parents=True, exist_ok=True)
    linked = []
    for entry in sorted(source.iterdir()):
        if entry.name.startswith("."):
            continue
        link = out_dir / entry.name
        if link.is_symlink() and link.resolve() == entry.resolve():
            linked.append(entry.name)
            continue
        if link.exists() or link.is_symlink():
            raise ReprolibError(f"{link} already exists and is not a link to {entry}")
        link.symlink_to(entry, target_is_directory=entry.is_dir())
        linked.append(entry.name)
    return {"source": str(source), "linked": linked}


def prepare_synthetic(out_dir, num_passages=5000, num_train_queries=None, num_dev_queries=None, seed=42,
                      unlabelled_twins=0.0, twins_per_fact=1, fixed_wording=False, bm25_depth=200, progress=True):
    """Generate the synthetic dataset, then BM25 negatives for its train queries (as MS MARCO ships)."""
    out_dir = Path(out_dir)
    stats = synthetic.generate(out_dir, num_passages=num_passages, num_train_queries=num_train_queries,
                               num_dev_queries=num_dev_queries, seed=seed, unlabelled_twins=unlabelled_twins,
                               twins_per_fact=twins_per_fact, fixed_wording=fixed_wording, progress=progress)
    write_bm25_negatives(out_dir, split="train", depth=bm25_depth, progress=progress)
    return stats


def write_bm25_negatives(dataset_dir, split="train", depth=200, progress=True):
    """`<split>.negatives.tsv`: BM25 top-`depth` minus positives, in rank order."""
    dataset_dir = Path(dataset_dir)
    corpus = Corpus.open(dataset_dir, progress=progress)
    queries = read_queries(dataset_dir / f"{split}.query.txt")
    qrels = read_qrels(dataset_dir / f"qrels.{split}.tsv")
    run = bm25_search(corpus, queries, topk=depth, progress=progress)
    path = dataset_dir / f"{split}.negatives.tsv"
    write_negatives(path, mine_negatives(run, qrels, depth=depth))
    return path
