"""Diagnostic: how good a starting point a checkpoint's MLM head is for a sparse (LexMAE / SPLADE) retriever.

    .venv/bin/python bench/lexical_start.py --data DATA_DIR NAME=CHECKPOINT [NAME=CHECKPOINT ...]
        # -> bench/results/lexical_start.json (--out to write elsewhere)

A sparse retriever scores a text by max over its positions of log(1 + ReLU(logits)): it starts as good as its
head is at putting each text's own words, above all its rare ones (names, numbers: what a query shares with its
answer and with little else), on top. For every checkpoint (a folder `SparseEncoder.from_pretrained` loads; one
without an MLM head gets reprolib's new identity head), over every `--every`-th passage of the corpus in
DATA_DIR, rendered with `--template` (LexMAE's title[SEP]passage by default, as its pretraining and fine-tuning
read them), without masking anything:

    copy_rate_rare / copy_rate_common   share of text positions whose top logit is the position's own token, for
                                        tokens the corpus holds fewer than `--rare-below` times / at least 10x that
    rare_in_top20                       share of a passage's rare tokens among its 20 heaviest terms
    nonzeros_per_passage                terms with a positive weight (a new head's bias is not calibrated here)
"""
import argparse
import collections
import sys
from pathlib import Path

from benchutil import RESULTS, header, write_json


def measure(path, corpus, every, rare_below, template):
    import numpy as np
    import torch

    from reprolib.data.templates import get_template
    from reprolib.modeling.sparse import SparseEncoder

    encoder = SparseEncoder.from_pretrained(path)
    tokenizer = encoder.tokenizer
    render = get_template(template).render
    passages = [render(corpus.title(i), corpus.text(i), sep=tokenizer.sep_token) for i in range(len(corpus))]
    counts = collections.Counter()
    for passage in passages:
        counts.update(tokenizer(passage, add_special_tokens=False)["input_ids"])
    texts = passages[::every]
    copied = {"rare": [], "common": []}
    rare_in_top, nonzeros = [], []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = encoder.tokenize(texts[start:start + 64], "passage")
            logits = encoder.model(**batch).logits
            ids = batch["input_ids"]
            text = batch["attention_mask"].bool() & ~torch.isin(ids, encoder.special_ids)
            count = torch.tensor([[counts[int(t)] for t in row] for row in ids])
            rare, common = text & (count < rare_below), text & (count >= 10 * rare_below)
            own = logits.argmax(-1) == ids
            copied["rare"] += own[rare].tolist()
            copied["common"] += own[common].tolist()
            weights = torch.log1p(torch.relu(logits.masked_fill(~text.unsqueeze(-1), float("-inf")).amax(1)))
            nonzeros += (weights > 0).sum(1).tolist()
            for row in range(len(ids)):
                wanted = set(ids[row][rare[row]].tolist())
                if wanted:
                    rare_in_top.append(len(wanted & set(weights[row].topk(20).indices.tolist())) / len(wanted))
    return {"checkpoint": str(path), "vocabulary": len(tokenizer), "passages": len(texts),
            "rare_positions": len(copied["rare"]), "copy_rate_rare": round(float(np.mean(copied["rare"])), 4),
            "copy_rate_common": round(float(np.mean(copied["common"])), 4),
            "rare_in_top20": round(float(np.mean(rare_in_top)), 4),
            "nonzeros_per_passage": round(float(np.mean(nonzeros)), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT")
    parser.add_argument("--data", required=True, help="a dataset folder with the corpus (e.g. a data stage's out)")
    parser.add_argument("--every", type=int, default=25, help="measure every N-th passage (default 25)")
    parser.add_argument("--template", default="lexmae", help="how a passage is rendered (default lexmae)")
    parser.add_argument("--rare-below", type=int, default=100, help="a token is rare below this corpus count")
    parser.add_argument("--out", type=Path, default=RESULTS / "lexical_start.json")
    args = parser.parse_args()

    import torch

    from reprolib.data import Corpus

    torch.set_num_threads(1)
    corpus = Corpus.open(args.data, progress=False)
    result = header("lexical_start") | {"data": args.data, "every": args.every, "template": args.template,
                                        "rare_below": args.rare_below, "checkpoints": {}}
    for spec in args.checkpoints:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"lexical_start: {spec!r} is not NAME=CHECKPOINT")
        result["checkpoints"][name] = row = measure(path, corpus, args.every, args.rare_below, args.template)
        print(name, {k: v for k, v in row.items() if k != "checkpoint"}, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
