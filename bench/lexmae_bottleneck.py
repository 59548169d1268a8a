"""Diagnostic: does LexMAE's decoder use the bottleneck? Its loss with each passage's own lexicon against another's.

    .venv/bin/python bench/lexmae_bottleneck.py                     # -> bench/results/lexmae_bottleneck.json
    .venv/bin/python bench/lexmae_bottleneck.py --decoder-mask 0.8  # a harder decoder task

LexMAE's claim rests on the decoder needing the encoder's lexicon b = softmax(v) @ E to rebuild the masked half of
the passage: only then does the encoder learn to put the passage's own words into v, which the sparse retriever
reads. If the decoder can guess its masked words from the unmasked half alone, b carries no gradient worth having
and LexMAE is MLM with extra cost. This script pretrains the LexMAE miniature's model (params/miniature/lexmae.yaml:
`scratch:tiny`, 32 passages of the synthetic corpus a step, lr 2e-3, warmup 10% then linear decay, weight decay
0.01, encoder masks 0.3) with a plain loop, and every `--every` steps scores 8 held-out batches in eval mode three
ways: the decoder with each passage's own b, with the b of the previous passage of a shuffled batch (rolled), and
with b = 0.
own < rolled means the decoder reads the passage's lexicon.
"""
import argparse
import tempfile
import time

from benchutil import RESULTS, header, pretrain_with_probes, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--decoder-mask", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--layer-norm", action="store_true",
                        help="bottleneck_layer_norm: b through the embeddings' LayerNorm, as the other inputs are")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from reprolib.data import Corpus
    from reprolib.data.prepare import prepare
    from reprolib.data.pretraining import PretrainingExamples, build_sequences
    from reprolib.modeling.lexmae import LexMAEForPretraining
    from reprolib.modeling.scratch import build_scratch_model
    from reprolib.training import TrainConfig, _optimizer, _schedule

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = tempfile.mkdtemp()
    prepare("synthetic", f"{work}/synthetic", num_passages=5000, progress=False)
    corpus = Corpus.open(f"{work}/synthetic", progress=False)
    init = build_scratch_model(corpus, f"{work}/tiny", size="tiny", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(init))
    examples = PretrainingExamples(build_sequences(corpus, tokenizer, "lexmae", 64), tokenizer, "lexmae",
                                   decoder_ratio=args.decoder_mask, seed=args.seed)
    # 8 batches of 32 never trained on, shuffled so that a rolled b is mostly another entity's (an entity's four
    # passages are neighbours in the corpus)
    held_out = torch.randperm(256, generator=torch.Generator().manual_seed(0)).add(len(examples) - 256).tolist()
    trained = len(examples) - len(held_out)
    model = LexMAEForPretraining.from_pretrained(str(init), bottleneck_layer_norm=args.layer_norm)
    # the training loop's own optimizer and schedule, with the miniature's settings
    config = TrainConfig(model=str(init), out_dir=work, train_data=work, objective="lexmae", learning_rate=2e-3,
                         weight_decay=0.01, warmup_ratio=0.1)
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, config, args.steps)
    bottleneck = model.bottleneck

    def decoder_losses():
        model.eval()
        totals = {"own": 0.0, "rolled": 0.0, "zero": 0.0}
        with torch.no_grad():
            for start in range(0, len(held_out), 32):
                batch = examples.collate([examples[i] for i in held_out[start:start + 32]])
                for name, change in (("own", lambda b: b), ("rolled", lambda b: b.roll(1, dims=0)),
                                     ("zero", torch.zeros_like)):
                    model.bottleneck = lambda v, change=change: (lambda a, b: (a, change(b)))(*bottleneck(v))
                    totals[name] += model(**batch)[2].item() / (len(held_out) / 32)
        model.bottleneck = bottleneck
        model.train()
        point = {k: round(v, 4) for k, v in totals.items()}
        point["rolled_minus_own"] = round(point["rolled"] - point["own"], 4)
        return point

    result = header("lexmae_bottleneck")
    result.update(steps=args.steps, decoder_mask=args.decoder_mask, layer_norm=args.layer_norm, seed=args.seed)
    order = torch.randperm(trained, generator=torch.Generator().manual_seed(args.seed)).tolist()
    started = time.perf_counter()
    result["curve"] = pretrain_with_probes(model, examples, order, optimizer, schedule, args.steps, args.every,
                                           decoder_losses)
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = "lexmae_bottleneck" + (f"_mask{args.decoder_mask:g}" if args.decoder_mask != 0.5 else "") \
        + ("_layer_norm" if args.layer_norm else "")
    write_json(RESULTS / f"{name}.json", result)


if __name__ == "__main__":
    main()
