"""Diagnostic: does RetroMAE's decoder read [CLS]? Its loss with each passage's own sentence embedding against another's.

    .venv/bin/reprolib run params/miniature/retromae.yaml --out outputs/ret712 --jobs 2 --seeds 7,8,9,10,11,12
    .venv/bin/python bench/retromae_bottleneck.py outputs/ret712/miniature_retromae --seed 7
        # -> bench/results/retromae_bottleneck.json; --decoder-mask 0.8: a harder decoder task

RetroMAE's claim rests on the decoder needing h, the encoder's [CLS] vector, to rebuild the passage: only then
does the encoder learn to put the passage into h, which the retriever pools. If the decoder can guess each token
from the other tokens it sees, h carries no gradient worth having. This script continues the miniature's MLM base
(`pretrain_base_seed<seed>` of a finished run) as its `pretrain_retromae` stage does (the same objective, masks,
data and settings, built by the training loop's own code: 32 passages a step, lr 5e-4, warmup 10% then linear
decay, weight decay 0.01), in a plain loop, and every `--every` steps scores 8 held-out batches in eval mode three
ways: the decoder given each passage's own h, the h of the previous passage of a shuffled batch (rolled), and
h = 0. own < rolled means the decoder reads the passage's embedding; the same split by rare tokens (in at most 20
passages: names, numbers) and frequent ones (template words and synonyms) says what it reads it for. (The held-out passages are trained on too:
the miniature pretrains on its whole corpus, so this measures the decoder on passages it has seen.)
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from benchutil import RESULTS, header, require_run_outputs, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of params/miniature/retromae.yaml")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--decoder-mask", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base = args.run_dir / f"pretrain_base_seed{args.seed}" / "model"
    require_run_outputs(args.run_dir, ["data", f"pretrain_base_seed{args.seed}/model"], "miniature/retromae.yaml")

    import torch

    from reprolib.data import Corpus
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig, _optimizer, _schedule

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    corpus = Corpus.open(args.run_dir / "data", progress=False)
    # the miniature's pretrain_retromae stage (params/miniature/retromae.yaml, notebook 10's template)
    config = TrainConfig(model=str(base), out_dir=tempfile.mkdtemp(), train_data=str(args.run_dir / "data"),
                         objective="retromae", template="retromae_pretrain", passage_max_len=64, pack=False,
                         encoder_mask_ratio=0.3, decoder_mask_ratio=args.decoder_mask, decoder_loss_weight=1.0,
                         batch_size=32, max_steps=args.steps, learning_rate=5e-4, warmup_ratio=0.1,
                         weight_decay=0.01, seed=args.seed, progress=False)
    objective = build_objective(config, corpus)
    model, examples = objective.model, objective.examples
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, config, args.steps)
    # 8 batches of 32, shuffled so that a rolled h is mostly another entity's (an entity's four passages are
    # neighbours in the corpus)
    held_out = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:256].tolist()
    # rare tokens (in at most 20 passages: entity stems, names, numbers) carry what a query shares with its passage;
    # frequent ones (template words, synonyms, in hundreds) a passage's surface form, which queries draw anew
    passages_with = torch.zeros(len(objective.tokenizer), dtype=torch.long)
    for i in range(len(examples)):
        passages_with[torch.as_tensor(examples.sequences[i]).long().unique()] += 1
    rare = passages_with <= 20

    def only(labels, keep):
        return labels.masked_fill(~keep[labels.clamp(min=0)] | (labels < 0), -100)

    def decoder_losses():
        model.eval()
        totals = {}
        with torch.no_grad():
            for start in range(0, len(held_out), 32):
                batch = examples.collate([examples[i] for i in held_out[start:start + 32]])
                h = model.lm.bert(input_ids=batch["encoder_input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state[:, :1]
                labels = batch["decoder_labels"]
                for tokens, kept in (("", labels), ("_rare", only(labels, rare)), ("_frequent", only(labels, ~rare))):
                    for name, given in (("own", h), ("rolled", h.roll(1, dims=0)), ("zero", torch.zeros_like(h))):
                        if tokens and name == "zero":
                            continue
                        loss = model.decode(given, batch["decoder_input_ids"], batch["decoder_visibility"], kept)
                        totals[name + tokens] = totals.get(name + tokens, 0.0) + loss.item() / (len(held_out) / 32)
        model.train()
        return {k: round(v, 4) for k, v in totals.items()}

    result = header("retromae_bottleneck")
    result.update(run_dir=str(args.run_dir), seed=args.seed, steps=args.steps, decoder_mask=args.decoder_mask,
                  curve=[])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    started = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            point = {"step": step, **decoder_losses()}
            for tokens in ("", "_rare", "_frequent"):
                point["rolled_minus_own" + tokens] = round(point["rolled" + tokens] - point["own" + tokens], 4)
            result["curve"].append(point)
            print(point, file=sys.stderr, flush=True)
        if step == args.steps:
            break
        first = (step * 32) % len(examples)
        examples.set_epoch((step * 32) // len(examples))         # new masks every pass, as the pipeline draws them
        batch = examples.collate([examples[order[(first + i) % len(examples)]] for i in range(32)])
        total, _, _ = model(**batch)
        total.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(total.item()):
            sys.exit(f"loss is {total.item()} at step {step}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = "retromae_bottleneck" + (f"_mask{args.decoder_mask:g}" if args.decoder_mask != 0.5 else "")
    write_json(RESULTS / f"{name}.json", result)


if __name__ == "__main__":
    main()
