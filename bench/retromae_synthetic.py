"""Experiment: does RetroMAE pretraining help a small BERT on the synthetic data? Three seeds, six numbers.

    .venv/bin/python bench/retromae_synthetic.py            # -> bench/results/retromae_synthetic.json

For each seed s, one tiny BERT is built from the synthetic corpus (`scratch:tiny`, weights from s) and
fine-tuned two ways with the same recipe (BM25 negatives, the quickstart's stage-1 settings with CLS pooling as
RetroMAE's retriever uses):

    pretrained: RetroMAE pretraining on the corpus (PRETRAIN below), then fine-tuning
    control:    fine-tuning straight from the random initialisation

and both are evaluated on the dev queries (MRR@10, exact search). The data set is the quickstart's
(5,000 passages, seed 42) for every seed; the seed changes the initial weights, the masks and the batches.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchutil import RESULTS, dev_rr10, header, write_json

# The settings of the quickstart's former RetroMAE stages, which this experiment measured.
# Passages packed into 64-token blocks, as reprolib did then (one passage per sequence is the default now).
PRETRAIN = {"passage_max_len": 64, "pack": True, "batch_size": 32, "max_steps": 600, "learning_rate": 2.0e-3,
            "warmup_ratio": 0.1, "weight_decay": 0.01}
FINETUNE = {"pooling": "cls", "normalize": True, "temperature": 0.05, "query_max_len": 32, "passage_max_len": 96,
            "group_size": 4, "batch_size": 32, "epochs": 1, "learning_rate": 5.0e-4, "warmup_ratio": 0.1}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--pooling", default="cls")
    parser.add_argument("--out", type=Path, default=RESULTS / "retromae_synthetic.json")
    args = parser.parse_args()

    from reprolib.data.prepare import prepare
    from reprolib.training import TrainConfig, train

    result = header("retromae_synthetic")
    pretrain_params, finetune_params = dict(PRETRAIN), {**FINETUNE, "pooling": args.pooling}
    result.update(pretrain=pretrain_params, finetune=finetune_params, runs=[])
    quiet = dict(progress=False, tensorboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        prepare("synthetic", data, num_passages=5000, seed=42, progress=False)
        for seed in args.seeds:
            run = {"seed": seed}
            started = time.perf_counter()
            train(TrainConfig(model="scratch:tiny", out_dir=str(tmp / f"pretrain-{seed}"), train_data=str(data),
                              seed=seed, **pretrain_params, **quiet), log=lambda *_: None)
            run["pretrain_seconds"] = round(time.perf_counter() - started, 1)
            for name, model in (("pretrained", str(tmp / f"pretrain-{seed}" / "model")), ("control", "scratch:tiny")):
                out = tmp / f"{name}-{seed}"
                summary = train(TrainConfig(model=model, out_dir=str(out), train_data=str(data), seed=seed,
                                            **finetune_params, **quiet),
                                log=lambda *_: None)
                run[f"{name}_RR@10"] = round(dev_rr10(out / "model", data, out), 4)
                run[f"{name}_finetune_seconds"] = summary["seconds"]
            print(json.dumps(run), file=sys.stderr, flush=True)
            result["runs"].append(run)
    pretrained = [r["pretrained_RR@10"] for r in result["runs"]]
    control = [r["control_RR@10"] for r in result["runs"]]
    result["summary"] = {"pretrained_mean": round(sum(pretrained) / len(pretrained), 4),
                         "control_mean": round(sum(control) / len(control), 4),
                         "pretrained_wins": sum(p > c for p, c in zip(pretrained, control)),
                         "seeds": len(pretrained)}
    write_json(args.out, result)
    print(json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
