"""Probe: what does each pretraining put into [CLS] before any fine-tuning, in the RetroMAE miniature?

    .venv/bin/reprolib run params/miniature/retromae.yaml --out outputs/ret712 --jobs 2 --seeds 7,8,9,10,11,12
    .venv/bin/python bench/retromae_cls_probe.py outputs/ret712/miniature_retromae --seeds 7 8 9 10 11 12
    .venv/bin/python bench/retromae_cls_probe.py outputs/retnsp/miniature_retromae_nsp --seeds 7 8 9 10 11 12 \
        --arms pretrain_base pretrain_retromae pretrain_mlm pretrain_bert \
        --out bench/results/retromae_cls_probe_nsp.json                            # bench/retromae_nsp.yaml's run

For every pretrained checkpoint of a finished run (`pretrain_base`, `pretrain_retromae`, `pretrain_mlm` per seed;
`--arms` names others) it encodes the 5,000 passages and 2,000 dev queries with [CLS] pooling, as the fine-tuning
will, and reports:
  * cls_cosine: the mean cosine between two passages' [CLS] vectors (1.0: every passage the same vector);
  * RR@10 zero-shot on cosines, raw and after subtracting each side's mean vector (centred): centring removes the
    direction every passage shares, so a [CLS] that differs little but informatively still retrieves.
RetroMAE's claim is that its decoder makes [CLS] carry the passage; if so its centred zero-shot RR@10 should beat
MLM-only's, whatever one epoch of fine-tuning later makes of it. A few seconds per checkpoint.
"""
import argparse
import statistics
from pathlib import Path
from typing import NamedTuple

import numpy as np
from benchutil import RESULTS, header, require_run_outputs, write_json

ARMS = ("pretrain_base", "pretrain_retromae", "pretrain_mlm")


def rr10(queries, passages, dev):
    """Dev RR@10 of exact cosine search (rows already L2-normalised), scored by the library's `evaluate`."""
    from reprolib.metrics import evaluate

    scores = queries @ passages.T
    top = np.argsort(-scores, axis=1)[:, :10]
    run = {qid: {dev.pids[i]: float(scores[row, i]) for i in top[row]} for row, qid in enumerate(dev.qids)}
    return evaluate(run, dev.qrels, "RR@10").aggregate["RR@10"]


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


class Dev(NamedTuple):
    """The run's passages and dev queries, read once for every checkpoint."""
    passages: list      # (title, text)
    pids: list
    qids: list
    texts: list
    qrels: dict


def read_dev(data):
    from reprolib.data import Corpus, read_qrels
    from reprolib.data.layout import find_qrels_file, load_queries

    corpus = Corpus.open(data, progress=False)
    queries = load_queries(data, "dev")
    return Dev([(corpus.title(i), corpus.text(i)) for i in range(len(corpus))],
               [corpus.id(i) for i in range(len(corpus))], list(queries), list(queries.values()),
               read_qrels(find_qrels_file(data, "dev")))


def probe(checkpoint, dev):
    from reprolib.modeling import DenseEncoder

    encoder = DenseEncoder.from_pretrained(checkpoint, pooling="cls", normalize=False).eval()
    p = encoder.encode_passages(dev.passages, template="plain", batch_size=128)
    q = encoder.encode_queries(dev.texts, batch_size=128)
    pu = unit(p)
    sample = pu[np.random.default_rng(0).choice(len(pu), 1000, replace=False)]
    cosine = sample @ sample.T
    off_diagonal = (cosine.sum() - np.trace(cosine)) / (len(sample) * (len(sample) - 1))
    return {"cls_cosine": round(float(off_diagonal), 4),
            "rr10_raw": round(rr10(unit(q), pu, dev), 4),
            "rr10_centred": round(rr10(unit(q - q.mean(0)), unit(p - p.mean(0)), dev), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of params/miniature/retromae.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="the pretraining stages probed")
    parser.add_argument("--out", type=Path, default=RESULTS / "retromae_cls_probe.json")
    args = parser.parse_args()
    require_run_outputs(args.run_dir, ["data"] + [f"{arm}_seed{s}/model" for arm in args.arms for s in args.seeds],
                        "miniature/retromae.yaml")
    result = header("retromae_cls_probe")
    result.update(run_dir=str(args.run_dir), seeds=args.seeds, checkpoints={})
    dev = read_dev(args.run_dir / "data")
    for seed in args.seeds:
        for arm in args.arms:
            row = probe(args.run_dir / f"{arm}_seed{seed}" / "model", dev)
            result["checkpoints"][f"{arm}_seed{seed}"] = row
            print(f"seed {seed:3d}  {arm:18s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    result["means"] = {arm: {key: round(statistics.fmean(result["checkpoints"][f"{arm}_seed{s}"][key]
                                                         for s in args.seeds), 4)
                             for key in ("cls_cosine", "rr10_raw", "rr10_centred")} for arm in args.arms}
    print(result["means"])
    write_json(args.out, result)


if __name__ == "__main__":
    main()
