"""Benchmark data: SciFact with 1,500 pseudo-queries added to its training queries, for
`bench/scifact_pseudo_queries.yaml` (distillation on unlabelled queries, GPL's setting).

    .venv/bin/python bench/scifact_pseudo_queries.py     # writes outputs/scifact_pq in under a second

A pseudo-query is the title of a random abstract (seeded; titles of four words or more), labelled with that
abstract: SciFact's claims read like titles, and no query generator runs offline here. The folder is a BEIR
dataset: SciFact's corpus and test qrels linked, its queries plus the pseudo-queries (ids `pq<doc id>`), its train
qrels plus one line per pseudo-query. Skips (exit 0) when SciFact is absent.
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

from benchutil import REPO, SCIFACT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "scifact_pq")
    parser.add_argument("--queries", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not (SCIFACT / "corpus.jsonl").is_file():
        print(f"skipped: SciFact is not at {SCIFACT}")
        return 0

    from reprolib.fileio import atomic_write

    docs = [json.loads(line) for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8")]
    titled = [doc for doc in docs if len(doc.get("title", "").split()) >= 4]
    picked = random.Random(args.seed).sample(titled, args.queries)

    (args.out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "qrels/test.tsv"):
        if not os.path.lexists(args.out / name):   # a link left by an earlier run stays
            os.symlink(SCIFACT / name, args.out / name)
    with atomic_write(args.out / "queries.jsonl") as f:
        f.write((SCIFACT / "queries.jsonl").read_text(encoding="utf-8"))
        for doc in picked:
            f.write(json.dumps({"_id": "pq" + doc["_id"], "text": doc["title"], "metadata": {}}) + "\n")
    with atomic_write(args.out / "qrels" / "train.tsv") as f:
        f.write((SCIFACT / "qrels" / "train.tsv").read_text(encoding="utf-8"))
        f.writelines(f"pq{doc['_id']}\t{doc['_id']}\t1\n" for doc in picked)
    print(f"{len(picked)} pseudo-queries of {len(titled)} titled abstracts -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
