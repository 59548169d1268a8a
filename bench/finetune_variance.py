"""Experiment: in the RetroMAE miniature, does a start's score come from its pretraining or from the fine-tuning's draw?

    .venv/bin/reprolib run params/miniature/retromae.yaml --out outputs/ret6 --jobs 2 --seeds 1,2,3,4,5,6 \
        --set pretrain_retromae.model=scratch:tiny --set pretrain_mlm.model=scratch:tiny \
        --set pretrain_retromae.learning_rate=2.0e-3 --set pretrain_mlm.learning_rate=2.0e-3
    .venv/bin/python bench/finetune_variance.py outputs/ret6/miniature_retromae   # -> results/finetune_variance.json

(the overrides pretrain each arm from random weights, as the miniature did when this was measured; 2efd97a gave the
arms a shared base). 48 fine-tunings of about 14 s each on an AVX-512 Xeon (12 minutes).

The miniature's check compares RetroMAE-pretrained and MLM-only-pretrained starts, each fine-tuned once per seed
with the seed it was pretrained with. At seeds 4-6 one MLM-only start fine-tuned to 0.80 where the others reached
0.53-0.59. This script takes the pretrained checkpoints of a finished run (`pretrain_{retromae,mlm}_seed<s>`) and
fine-tunes each again with other fine-tuning seeds (the same YAML settings: only the seed, so the batches' order and
negatives, changes), then evaluates dev RR@10. If the score follows the checkpoint, the pretraining decides it; if
it follows the fine-tuning seed, one fine-tuning per start cannot rank the starts, whatever the pretraining did.
It also copies, per checkpoint, how alike its [CLS] vectors were before fine-tuning (the mean cosine between
passages that notebook 20 recorded as `passage_cosine_before`).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchutil import REPO, RESULTS, dev_rr10, header, require_run_outputs, write_json

YAML = REPO / "params" / "miniature" / "retromae.yaml"
ARMS = {"retromae": "pretrain_retromae", "mlm": "pretrain_mlm"}


def finetune_params():
    """The miniature's fine-tuning options (stage finetune_retromae), without its model, data and seed."""
    from reprolib.pipeline import load_pipeline

    stage = next(s for s in load_pipeline(YAML).stages if (s.base or s.id) == "finetune_retromae")
    return {k: v for k, v in stage.params.items() if k not in ("model", "train_data", "seed")}


def spread(runs, arm):
    """Within a checkpoint (sd over fine-tuning seeds, averaged) against between checkpoints (sd of their means)."""
    by_checkpoint = {}
    for r in runs:
        if r["arm"] == arm:
            by_checkpoint.setdefault(r["pretrain_seed"], []).append(r["RR@10"])
    means = [statistics.fmean(v) for v in by_checkpoint.values()]
    within = [statistics.stdev(v) for v in by_checkpoint.values() if len(v) > 1]
    return {"mean": round(statistics.fmean(means), 4),
            "checkpoint_means": {s: round(statistics.fmean(v), 4) for s, v in by_checkpoint.items()},
            "sd_between_checkpoints": round(statistics.stdev(means), 4) if len(means) > 1 else None,
            "sd_within_checkpoint": round(statistics.fmean(within), 4) if within else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of params/miniature/retromae.yaml")
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[101, 102, 103, 104])
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune_variance.json")
    args = parser.parse_args()
    needed = ["data"]
    for arm, stage in ARMS.items():
        needed += [f"{stage}_seed{s}/model" for s in args.pretrain_seeds]
        needed += [f"finetune_{arm}_seed{s}/metrics.json" for s in args.pretrain_seeds]
    require_run_outputs(args.run_dir, needed, "miniature/retromae.yaml")

    from reprolib.training import TrainConfig, train

    data = args.run_dir / "data"
    params = finetune_params()
    result = header("finetune_variance")
    result.update(run_dir=str(args.run_dir), finetune=params, cls_cosine_before={}, runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        for arm, stage in ARMS.items():
            for pseed in args.pretrain_seeds:
                checkpoint = args.run_dir / f"{stage}_seed{pseed}" / "model"
                # notebook 20 measured it on this checkpoint when the run fine-tuned it
                before = json.loads((args.run_dir / f"finetune_{arm}_seed{pseed}" / "metrics.json").read_text())
                result["cls_cosine_before"][f"{arm}_seed{pseed}"] = round(before["passage_cosine_before"], 4)
                for fseed in args.finetune_seeds:
                    out = Path(tmp) / f"{arm}-{pseed}-{fseed}"
                    started = time.perf_counter()
                    train(TrainConfig.from_dict({**params, "model": str(checkpoint), "out_dir": str(out),
                                                 "train_data": str(data), "seed": fseed, "progress": False,
                                                 "tensorboard": False}, source="finetune_variance"),
                          log=lambda *_: None)
                    run = {"arm": arm, "pretrain_seed": pseed, "finetune_seed": fseed,
                           "RR@10": round(dev_rr10(out / "model", data, out), 4),
                           "seconds": round(time.perf_counter() - started, 1)}
                    print(json.dumps(run), file=sys.stderr, flush=True)
                    result["runs"].append(run)
    result["summary"] = {arm: spread(result["runs"], arm) for arm in ARMS}
    write_json(args.out, result)
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
