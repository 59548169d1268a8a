"""Benchmark: training steps/s of reprolib's contrastive step vs sentence-transformers' MultipleNegativesRankingLoss.

    .venv/bin/python bench/train_throughput.py              # -> bench/results/train_throughput.json
    .venv/bin/python bench/train_throughput.py --steps 2 --repeats 1 --out /tmp/quick.json

Identical batches on both sides: B SciFact training queries, each with its positive and G-1 passages drawn
from the corpus (seeded), max length 256, all-MiniLM-L6-v2 (mean pooling, normalized), temperature 0.05 =
MNRL's scale 20, AdamW. A step is tokenize -> forward -> loss -> backward -> optimizer step:

* reprolib: `reprolib.training.forward_backward` (what `train()` runs per micro-batch: one forward over
  the B queries, one over the B*G passages, `contrastive_loss`) on an Accelerate-prepared DenseEncoder;
* sentence-transformers: its own loss on the columns (anchor, positive, negative_1 .. negative_{G-1}),
  one forward per column, as its trainer calls it.

Both sides compute the same loss: cross entropy over every passage of the batch (in-batch + hard
negatives). It is checked first, with dropout off, on the same weights (must agree within 1e-4). Then
each side trains its own copy for `--steps` steps per repeat, repeats alternating.
"""
import argparse
import random
import statistics
import time

from benchutil import RESULTS, SCIFACT, header, load_average, require_real_inputs, scifact_passages, write_json


def scifact_batches(num_batches, batch_size, group_size, seed=0):
    """Lists of (query, [positive, negatives...]) from SciFact train, with corpus-random negatives."""
    from reprolib.data import read_qrels
    from reprolib.data.layout import find_qrels_file, load_queries

    ids, texts = scifact_passages()
    corpus = dict(zip(ids, texts))
    queries = load_queries(SCIFACT, "train")
    pairs = [(qid, pid) for qid, judged in read_qrels(find_qrels_file(SCIFACT, "train")).items()
             for pid, rel in judged.items() if rel > 0 and qid in queries and pid in corpus]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    batches = []
    for b in range(num_batches):
        batch = []
        for qid, pid in pairs[b * batch_size:(b + 1) * batch_size]:
            negatives = [p for p in rng.sample(ids, group_size) if p != pid][:group_size - 1]
            batch.append((queries[qid], [corpus[pid]] + [corpus[p] for p in negatives]))
        batches.append(batch)
    return batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="queries per step")
    parser.add_argument("--group-size", type=int, default=4, help="1 positive + G-1 negatives per query")
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, for both")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args(argv)
    model_dir, _ = require_real_inputs()

    import torch
    from accelerate import Accelerator
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    from reprolib.losses import contrastive_loss
    from reprolib.modeling import DenseEncoder
    from reprolib.objectives import Contrastive, collate
    from reprolib.training import TrainConfig, forward_backward

    torch.set_num_threads(args.threads)
    result = header("train_throughput")
    batches = scifact_batches(args.steps + 1, args.batch_size, args.group_size)
    G = args.group_size

    config = TrainConfig(model=str(model_dir), out_dir="unused", train_data=str(SCIFACT), group_size=G,
                         temperature=0.05, batch_size=args.batch_size)
    accelerator = Accelerator(cpu=True)
    encoder = DenseEncoder.from_pretrained(model_dir, query_max_len=args.max_len, passage_max_len=args.max_len)
    assert (encoder.pooling, encoder.normalize) == ("mean", True), "the ST folder's settings were not picked up"
    ours_model, ours_optimizer = accelerator.prepare(encoder, torch.optim.AdamW(encoder.parameters(), lr=2e-5))
    objective = Contrastive(config, encoder)

    theirs = SentenceTransformer(str(model_dir), device="cpu")
    theirs.max_seq_length = args.max_len
    mnrl = MultipleNegativesRankingLoss(theirs, scale=20.0)
    theirs_optimizer = torch.optim.AdamW(theirs.parameters(), lr=2e-5)

    def ours_step(batch):
        items = [(query, texts, list(range(G)), [0]) for query, texts in batch]
        forward_backward(objective, ours_model, items, config, accelerator)
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def theirs_loss(batch):
        columns = [[query for query, _ in batch]] + [[texts[j] for _, texts in batch] for j in range(G)]
        tokenize = getattr(theirs, "preprocess", None) or theirs.tokenize   # renamed in sentence-transformers 6
        features = [tokenize(column) for column in columns]
        return mnrl(features, None)

    def theirs_step(batch):
        theirs_loss(batch).backward()
        theirs_optimizer.step()
        theirs_optimizer.zero_grad(set_to_none=True)

    # Same loss on the same weights, dropout off: the two steps compute the same thing.
    encoder.eval(), theirs.eval()
    with torch.no_grad():
        items = [(query, texts, list(range(G)), [0]) for query, texts in batches[0]]
        q_batch, p_batch, _, _ = collate(encoder, items, accelerator.device)
        q, p = encoder(query=q_batch, passage=p_batch)
        ours_loss = float(contrastive_loss(q, p, G, temperature=0.05))
        reference_loss = float(theirs_loss(batches[0]))
    result["loss_check"] = {"reprolib": ours_loss, "sentence_transformers": reference_loss,
                            "abs_diff": abs(ours_loss - reference_loss)}
    assert abs(ours_loss - reference_loss) < 1e-4, result["loss_check"]
    encoder.train(), theirs.train()

    steps = {"reprolib": ours_step, "sentence_transformers": theirs_step}
    for step in steps.values():
        step(batches[0])                                   # warm-up, untimed
    times = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            started = time.perf_counter()
            for batch in batches[1:]:
                steps[name](batch)
            times[name].append(time.perf_counter() - started)
            print(f"repeat {repeat} {name}: {args.steps / times[name][-1]:.3f} steps/s", flush=True)

    rate = {name: args.steps / statistics.median(t) for name, t in times.items()}
    result.update({
        "settings": {"batch_size": args.batch_size, "group_size": G, "max_len": args.max_len, "steps": args.steps,
                     "repeats": args.repeats, "torch_threads": args.threads, "model": str(model_dir)},
        "steps_per_second": rate,
        "queries_per_second": {name: r * args.batch_size for name, r in rate.items()},
        "seconds_per_repeat": times,
        "speedup": rate["reprolib"] / rate["sentence_transformers"],
        "load_average_at_end": load_average(),
    })
    print(f"reprolib {rate['reprolib']:.3f} vs sentence-transformers {rate['sentence_transformers']:.3f} steps/s: "
          f"{result['speedup']:.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
