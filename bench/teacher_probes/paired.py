"""A paired test between two seeded stages of two runs, each query's RR@10 averaged over the seeds first, as the
pipeline's own checks average a stage's seeds (`reprolib.report.run_checks`), but across run folders.

    .venv/bin/python bench/teacher_probes/paired.py outputs/dis/miniature_disentangled dense_distill_kl \
        outputs/dis_mmse_labels/miniature_disentangled dense_distill_kl --seeds 1,2,3
"""
import argparse
import json

import numpy as np

from reprolib.metrics import paired_test


def seed_averaged(run_dir, stage, seeds, metric):
    per_seed = [json.load(open(f"{run_dir}/{stage}_seed{seed}/per_query.json"))[metric] for seed in seeds]
    return {qid: float(np.mean([values[qid] for values in per_seed])) for qid in per_seed[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("run_a", "stage_a", "run_b", "stage_b"):
        parser.add_argument(name)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--metric", default="RR@10")
    args = parser.parse_args()
    seeds = args.seeds.split(",")
    test = paired_test(seed_averaged(args.run_a, args.stage_a, seeds, args.metric),
                       seed_averaged(args.run_b, args.stage_b, seeds, args.metric))
    print(f"{args.metric}: {test['mean_a']:.4f} -> {test['mean_b']:.4f}, difference {test['diff']:+.4f}, "
          f"p {test['p_randomization']:.4f} over {test['n']:,} queries")


if __name__ == "__main__":
    main()
