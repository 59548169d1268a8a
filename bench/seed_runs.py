"""Paired tests between stages, each query's metric first averaged over several run folders (one per seed), as the
pipeline's own checks average a seeded stage's copies (`reprolib.report.per_query_mean`).

    .venv/bin/python bench/seed_runs.py outputs/sci_pre_body/scifact_pretraining \
        outputs/sci_pre_body/scifact_pretraining_seed43 --loses-at-most 0.01 \
        dense_retromae_ident:dense_control dense_mlm_ident:dense_control dense_retromae_ident:dense_mlm_ident
    .venv/bin/python bench/seed_runs.py outputs/sci_sparse_body/scifact_sparse_body \
        outputs/sci_sparse_body/scifact_sparse_body_seed43 --metric quantized_nDCG@10 \
        sparse256_lexmae:sparse256_none sparse256_lexmae:bm25/nDCG@10

Each comparison is METHOD:CONTROL; a stage written STAGE/METRIC is read on that metric instead of --metric (BM25
has no quantized run). Prints each stage's mean, then per comparison the difference, the two-sided paired
randomization p and, with --loses-at-most m, the one-sided p that the method loses less than m (the report's
"loses_at_most" test).
"""
import argparse
from pathlib import Path

from reprolib.metrics import paired_test
from reprolib.report import non_inferiority_p, per_query_mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, then comparisons METHOD:CONTROL")
    parser.add_argument("--metric", default="nDCG@10")
    parser.add_argument("--loses-at-most", type=float)
    args = parser.parse_intermixed_args()
    comparisons = [str(r).split(":") for r in args.runs if ":" in str(r)]
    runs = [r.resolve() for r in args.runs if ":" not in str(r)]

    def table(spec):
        stage, _, metric = spec.partition("/")
        values = per_query_mean(Path(), [run / stage for run in runs], metric or args.metric)   # absolute paths
        if values is None:
            raise SystemExit(f"seed_runs.py: {stage} lacks a per_query.json with {metric or args.metric} in a run")
        return values

    tables = {spec: table(spec) for pair in comparisons for spec in pair}
    for spec, values in tables.items():
        print(f"{spec:32s} {sum(values.values()) / len(values):.4f} over {len(values)} queries, {len(runs)} runs")
    for method, control in comparisons:
        test = paired_test(tables[control], tables[method])
        line = f"{method} - {control}: {test['diff']:+.4f}, p {test['p_randomization']:.4f}"
        if args.loses_at_most is not None:
            p = non_inferiority_p(tables[control], tables[method], args.loses_at_most)
            line += f"; loses less than {args.loses_at_most}: p {p:.4f}"
        print(line)


if __name__ == "__main__":
    main()
