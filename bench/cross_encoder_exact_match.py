"""Benchmark: does the exact-match feature let a tiny cross-encoder learn on the synthetic set? Trains notebook 60's
cross-encoder from random weights with and without it and reranks two first-stage runs' dev top 20.

    .venv/bin/reprolib run params/quickstart.yaml --out outputs/qs            # the runs it reranks
    .venv/bin/python bench/cross_encoder_exact_match.py --run-dir outputs/qs/quickstart
    # -> bench/results/cross_encoder_exact_match_e2.json (with --arm A: ..._e2_A.json); --epochs 4 --learning-rate 5e-4
    #    for the longer training

Both arms: `scratch:tiny`, groups of 1 + 7 drawn from the top 20 of the stage-1 retriever's mined negatives
(the quickstart's `mine` stage), 16 queries a batch, no dropout, listwise loss; only `exact_match` differs. Each
trains on one thread (run the two arms side by side with --arm).
"""
import argparse
import time
from pathlib import Path

from benchutil import RESULTS, header, require_run_outputs, write_json

FIRST_STAGES = ("bm25", "dense_hn")   # the quickstart's BM25 and its stage 2


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a quickstart run folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--queries", type=int, default=500, help="the first N judged dev queries (qid order)")
    parser.add_argument("--arm", choices=("plain", "exact_match", "both"), default="both")
    parser.add_argument("--work", type=Path, default=Path("outputs/bench_cross_encoder_exact_match"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    require_run_outputs(args.run_dir, ["data", "mine/negatives.tsv", *(f"{s}/run.trec" for s in FIRST_STAGES)],
                        "quickstart.yaml")

    import torch

    from reprolib.data import Corpus, read_qrels, read_run
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.metrics import evaluate
    from reprolib.modeling import CrossEncoder
    from reprolib.rerank import rerank
    from reprolib.training import TrainConfig, read_log, train

    torch.set_num_threads(1)
    data = args.run_dir / "data"
    corpus, queries = Corpus.open(data, progress=False), load_queries(data, "dev")
    qrels = read_qrels(find_qrels_file(data, "dev"))
    qrels = {qid: qrels[qid] for qid in sorted(qrels)[:args.queries]}
    firsts = {}
    for name in FIRST_STAGES:
        run = read_run(args.run_dir / name / "run.trec")
        firsts[name] = {qid: dict(sorted(run[qid].items(), key=lambda h: -h[1])[:20]) for qid in qrels if qid in run}

    result = {**header("cross_encoder_exact_match"), "run_dir": str(args.run_dir), "epochs": args.epochs,
              "learning_rate": args.learning_rate, "queries": len(qrels), "arms": {}}
    for name, first in firsts.items():
        result[f"{name}_RR@10"] = evaluate(first, qrels, "RR@10").aggregate["RR@10"]
    arms = ("plain", "exact_match") if args.arm == "both" else (args.arm,)
    for arm in arms:
        out = args.work / f"{arm}_e{args.epochs}_lr{args.learning_rate:g}"
        config = TrainConfig(model="scratch:tiny", out_dir=str(out), train_data=str(data), objective="cross_encoder",
                             exact_match=arm == "exact_match", negatives=str(args.run_dir / "mine" / "negatives.tsv"),
                             passage_max_len=160, group_size=8, sample_neg_from_topk=20, batch_size=16,
                             epochs=args.epochs, learning_rate=args.learning_rate, warmup_ratio=0.1, weight_decay=0.01,
                             dropout=0.0, seed=42, progress=False, tensorboard=False)
        start = time.perf_counter()
        summary = train(config, log=lambda *_: None)
        seconds = time.perf_counter() - start
        losses = [row["loss"] for row in read_log(out / "train_log.csv")]
        model = CrossEncoder.from_pretrained(out / "model")
        row = {"train_steps": summary["steps"], "train_seconds": round(seconds, 1),
               "loss_first": round(losses[0], 4), "loss_last_50_mean": round(sum(losses[-50:]) / len(losses[-50:]), 4)}
        with torch.inference_mode():
            for name, first in firsts.items():
                reranked = rerank(model, first, corpus, queries, depth=20, progress=False)
                row[f"{name}_reranked_RR@10"] = evaluate(reranked, qrels, "RR@10").aggregate["RR@10"]
        result["arms"][arm] = row
        print(arm, row, flush=True)
    suffix = "" if args.arm == "both" else f"_{args.arm}"
    write_json(args.out or RESULTS / f"cross_encoder_exact_match_e{args.epochs}{suffix}.json", result)


if __name__ == "__main__":
    main()
