"""Benchmark: a teacher for SciFact that beats its student: the fine-tuned dense model fused with BM25.

    .venv/bin/python bench/fusion_teacher.py                  # after `reprolib run params/scifact_pretraining.yaml`
    .venv/bin/python bench/fusion_teacher.py --run-dir DIR    # that pipeline's outputs elsewhere

Reads the pipeline's `dense_control` (all-MiniLM-L6-v2 fine-tuned on SciFact train, no continued pretraining)
and `bm25` runs of the test queries, retrieves the train queries with the same model (`finetune_control`,
`index_control`) beside `bm25_train`'s run, and fuses the two systems per query (`reprolib.search.fuse_runs`):

    s(q, p) = (1 - w) * z_dense(q, p) + w * z_bm25(q, p)

where z is a score standardized over the query's hits (a passage missing from one list gets that list's lowest
z). The BM25 weight w is picked on the train queries, then the fusion is compared with the student on test
(nDCG@10, paired randomization test). Issue 13 §3 asks for a teacher ≥ 0.02 above its student with p < 0.05.
Skips (exit 0) when the pipeline's outputs are absent.
"""
import argparse
from pathlib import Path

from benchutil import REPO, RESULTS, header, require_run_outputs, write_json

WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "outputs" / "scifact_pretraining")
    parser.add_argument("--out", type=Path, default=RESULTS / "fusion_teacher.json")
    args = parser.parse_args(argv)
    run_dir = args.run_dir
    needed = ["dense_control/run.trec", "bm25/run.trec", "bm25_train/run.trec", "finetune_control/model",
              "index_control/index", "data"]
    require_run_outputs(run_dir, needed, "scifact_pretraining.yaml")

    from reprolib.data import Corpus, read_qrels, read_run
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.metrics import evaluate, paired_test
    from reprolib.modeling import load_encoder
    from reprolib.search import dense_search, fuse_runs, pick_fusion_weight

    data = run_dir / "data"
    corpus = Corpus.open(data, progress=False)
    qrels = {split: read_qrels(find_qrels_file(data, split)) for split in ("train", "test")}
    student = load_encoder(str(run_dir / "finetune_control" / "model"))
    dense_train = dense_search(student, load_queries(data, "train"), run_dir / "index_control" / "index", corpus,
                               topk=200, progress=False)
    bm25_train = read_run(run_dir / "bm25_train" / "run.trec")

    def ndcg(run, split):
        return evaluate(run, qrels[split], "nDCG@10")

    weight, on_train = pick_fusion_weight(dense_train, bm25_train, qrels["train"], WEIGHTS, metric="nDCG@10")
    dense_test, bm25_test = read_run(run_dir / "dense_control" / "run.trec"), read_run(run_dir / "bm25" / "run.trec")
    before, after = ndcg(dense_test, "test"), ndcg(fuse_runs(dense_test, bm25_test, weight), "test")
    test = paired_test(before.per_query["nDCG@10"], after.per_query["nDCG@10"])
    result = header("fusion_teacher")
    result.update(
        run_dir=str(run_dir),
        train={"dense_nDCG@10": round(ndcg(dense_train, "train").aggregate["nDCG@10"], 4),
               "bm25_nDCG@10": round(ndcg(bm25_train, "train").aggregate["nDCG@10"], 4),
               "fusion_nDCG@10_by_bm25_weight": {str(w): round(v, 4) for w, v in on_train.items()}},
        bm25_weight=weight,
        test={"student_nDCG@10": round(test["mean_a"], 4), "teacher_nDCG@10": round(test["mean_b"], 4),
              "difference": round(test["diff"], 4), "p_randomization": round(test["p_randomization"], 4),
              "bm25_nDCG@10": round(ndcg(bm25_test, "test").aggregate["nDCG@10"], 4), "queries": test["n"]},
    )
    write_json(args.out, result)
    print(f"BM25 weight {weight} (picked on {len(dense_train)} train queries); test nDCG@10: student "
          f"{test['mean_a']:.4f}, fusion teacher {test['mean_b']:.4f}, {test['diff']:+.4f}, p {test['p_randomization']:.4f}")


if __name__ == "__main__":
    main()
