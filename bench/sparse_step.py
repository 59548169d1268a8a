"""Benchmark: one sparse (SPLADE / LexMAE) training step of all-MiniLM-L6-v2, with the vocabulary projection fused
with the max over positions (`reprolib.modeling.sparse.max_pooled_projection`) or computed whole.

    .venv/bin/python bench/sparse_step.py                         # both variants, one after the other
    .venv/bin/python bench/sparse_step.py --variant reference     # one variant (what an A/B timer runs)

A step is what the sparse objective does to a batch of passages: the lexicon weights log(1 + ReLU(max logits))
with autograd, the FLOPS regulariser plus a stand-in ranking term, and backward. The passages are the first
`--passages` of SciFact (title + text) cut at 128 tokens, as `params/scifact_sparse.yaml` trains; the new head's
bias is calibrated first (256 terms a passage), as training starts. "reference" computes the [B, L, V] logits
and pools them, as the encoder did before the fused op; both variants' weights and gradients are compared. Each
variant runs in its own process so that its peak memory is its own. Skips (exit 0) without the model or SciFact.
"""
import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchutil import RESULTS, header, require_real_inputs, scifact_passages, write_json


def one_variant(variant, passages, steps, tensors=None):
    import torch

    import reprolib.modeling.sparse as sparse
    from reprolib.losses import flops_regularizer

    torch.manual_seed(0)
    model_dir, _ = require_real_inputs()
    encoder = sparse.SparseEncoder.from_pretrained(model_dir, query_max_len=64, passage_max_len=128)
    if variant == "reference":   # after loading, which starts the new head from the same lookup
        sparse._head_transform = lambda model: None       # the whole-logits path the encoder takes for other heads
    _, texts = scifact_passages()
    texts = texts[:passages]
    encoder.calibrate_bias(texts)
    encoder.train()
    batch = encoder.tokenize(texts, "passage")
    seconds, first = [], None
    for _ in range(steps):
        encoder.zero_grad(set_to_none=True)
        start = time.perf_counter()
        weights = encoder.embed(batch, "passage")
        loss = weights.sum() * 1e-3 + flops_regularizer(weights)   # a gradient on every active term, as training's
        loss.backward()
        seconds.append(time.perf_counter() - start)
        if first is None:
            first = {"weights": weights.detach(), "grad_embeddings": encoder.model.get_input_embeddings().weight.grad,
                     "grad_top_layer": encoder.model.base_model.encoder.layer[-1].output.dense.weight.grad}
    if tensors:
        torch.save(first, tensors)                        # for the orchestrating process's comparison
    return {"variant": variant, "passages": len(texts), "tokens_per_passage": int(batch["input_ids"].shape[1]),
            "steps": steps, "step_seconds_median": round(statistics.median(seconds), 3),
            "step_seconds": [round(s, 3) for s in seconds],
            "nonzeros_per_passage": float((first["weights"] > 0).sum(1).float().mean()),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=("fused", "reference"))
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tensors", type=Path, help="with --variant: save the first step's weights and gradients here")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse_step.json")
    args = parser.parse_args(argv)
    require_real_inputs()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.passages, args.steps, args.tensors)))
        return
    import tempfile

    import torch

    results, scratch = {}, Path(tempfile.mkdtemp(prefix="sparse_step."))
    for variant in ("fused", "reference"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--passages", str(args.passages),
                              "--steps", str(args.steps), "--tensors", str(scratch / f"{variant}.pt")],
                             check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant:>9}: {results[variant]['step_seconds_median']:.2f} s a step (median of {args.steps}), "
              f"peak RSS {results[variant]['peak_rss_gb']:.2f} GB")
    fused, reference = (torch.load(scratch / f"{v}.pt") for v in ("fused", "reference"))
    shutil.rmtree(scratch)
    differences = {key: float((fused[key] - reference[key]).abs().max()) for key in fused}
    speedup = results["reference"]["step_seconds_median"] / results["fused"]["step_seconds_median"]
    print(f"fused is {speedup:.2f}x faster; largest difference {max(differences.values()):.2e} ({differences})")
    write_json(args.out, {**header("sparse_step"), "variants": results, "speedup": round(speedup, 2),
                          "max_abs_difference": differences})


if __name__ == "__main__":
    main()
