"""The quickstart's synthetic data with a share of the training labels moved to a wrong passage.

Each training query's label moves, with probability `share` (a seeded `random.Random(7)`), to another passage of
the same entity (pids e*4 .. e*4+3), as a topical but wrong judgement; then BM25 negatives are mined from the
moved labels. Dev labels stay right; the true training labels are kept beside them in `qrels.train.true.tsv`
(`label_agreement.py` reads them). The Disentangled miniature on this folder (its data stage's params replaced
by `{dataset: <folder>}`) asks whether a teacher helps when the labels are wrong (bench/README.md, "What the
teacher adds beyond the labels").

    .venv/bin/python bench/teacher_probes/mislabel.py outputs/gen/mislabel30 0.3 [--folds 2]

With `--folds N` it also writes N folders `<out>_f0` .. that split the training queries into N seeded, equal folds
(each keeps its fold's queries, labels and BM25 negatives, and links the rest): a teacher trained on the other folds
scores a fold's queries without having seen their labels (`cross_fit.yaml`).
"""
import argparse
import os
import random
from pathlib import Path

from reprolib.data.formats import read_negatives, read_qrels, read_queries, write_negatives, write_qrels, write_queries
from reprolib.data.prepare import prepare_synthetic, write_bm25_negatives
from reprolib.data.synthetic import PASSAGES_PER_ENTITY
from reprolib.fileio import atomic_write


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the dataset folder to write")
    parser.add_argument("share", type=float, help="the share of training labels to move, 0 to 1")
    parser.add_argument("--folds", type=int, default=0, help="also split the training queries into this many folds")
    args = parser.parse_args()
    if args.folds == 1 or args.folds < 0:
        parser.error("--folds: give 2 or more folds")
    prepare_synthetic(args.out, num_dev_queries=2000, progress=False)
    path = f"{args.out}/qrels.train.tsv"
    lines = Path(path).read_text().splitlines()
    with atomic_write(f"{args.out}/qrels.train.true.tsv") as f:
        f.write("\n".join(lines) + "\n")
    rng = random.Random(7)
    moved = 0
    with atomic_write(path) as f:
        for line in lines:
            qid, zero, pid, rel = line.split("\t")
            if rng.random() < args.share:
                first = int(pid) // PASSAGES_PER_ENTITY * PASSAGES_PER_ENTITY
                pid = str(rng.choice([p for p in range(first, first + PASSAGES_PER_ENTITY) if p != int(pid)]))
                moved += 1
            f.write(f"{qid}\t{zero}\t{pid}\t{rel}\n")
    write_bm25_negatives(args.out, progress=False)
    print(f"moved {moved:,} of {len(lines):,} training labels")
    if args.folds:
        write_folds(Path(args.out), args.folds)


FOLD_FILES = {"train.query.txt": (read_queries, write_queries), "qrels.train.tsv": (read_qrels, write_qrels),
              "train.negatives.tsv": (read_negatives, write_negatives)}


def write_folds(dataset, n):
    """Folders `<dataset>_f0` .. `_f{n-1}`, each with one fold of the training queries (a seeded shuffle)."""
    tables = {name: read(dataset / name) for name, (read, _) in FOLD_FILES.items()}
    qids = list(tables["train.query.txt"])
    random.Random(11).shuffle(qids)
    fold = {qid: i % n for i, qid in enumerate(qids)}
    for k in range(n):
        out = dataset.with_name(f"{dataset.name}_f{k}")
        out.mkdir(exist_ok=True)
        for name, (_, write) in FOLD_FILES.items():
            write(out / name, {qid: row for qid, row in tables[name].items() if fold[qid] == k})
        for entry in dataset.iterdir():
            if entry.name not in FOLD_FILES and not (out / entry.name).is_symlink():
                (out / entry.name).symlink_to(os.path.relpath(entry, out))
        print(f"{out}: {sum(1 for f in fold.values() if f == k):,} training queries")


if __name__ == "__main__":
    main()
