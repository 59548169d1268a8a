"""A paired test between two seeded stages of two runs, each query's RR@10 averaged over the seeds first, as the
pipeline's own checks do (`reprolib.report.per_query_mean`), but across run folders.

    .venv/bin/python bench/teacher_probes/paired.py outputs/dis/miniature_disentangled dense_distill_kl \
        outputs/dis_mmse_labels/miniature_disentangled dense_distill_kl --seeds 1,2,3
"""
import argparse
from pathlib import Path

from reprolib.metrics import paired_test
from reprolib.report import per_query_mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("run_a", "stage_a", "run_b", "stage_b"):
        parser.add_argument(name)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--metric", default="RR@10")
    args = parser.parse_args()
    seeds = args.seeds.split(",")
    a, b = (per_query_mean(Path(run), [f"{stage}_seed{s}" for s in seeds], args.metric)
            for run, stage in ((args.run_a, args.stage_a), (args.run_b, args.stage_b)))
    if a is None or b is None:
        raise SystemExit("paired.py: a stage copy lacks its per_query.json")
    test = paired_test(a, b)
    print(f"{args.metric}: {test['mean_a']:.4f} -> {test['mean_b']:.4f}, difference {test['diff']:+.4f}, "
          f"p {test['p_randomization']:.4f} over {test['n']:,} queries")


if __name__ == "__main__":
    main()
