"""Diagnostic: does RetroMAE's decoder read [CLS]? Its loss given each passage's own embedding against another's.

    .venv/bin/reprolib run params/miniature/retromae.yaml --out outputs/ret712 --jobs 2 --seeds 7,8,9,10,11,12
    .venv/bin/python bench/retromae_bottleneck.py outputs/ret712/miniature_retromae --seed 7
        # -> bench/results/retromae_bottleneck_seed7.json; --decoder-mask 0.8: a harder decoder task

RetroMAE's claim rests on the decoder needing h, the encoder's [CLS] vector, to rebuild the passage: only then
does the encoder learn to put the passage into h, which the retriever pools. If the decoder can guess each token
from the other tokens it sees, h carries no gradient worth having. This script continues the miniature's MLM base
(`pretrain_base_seed<seed>` of a finished run) with the exact settings its `pretrain_retromae` stage trained with
(the stage's train_config.yaml) and the training loop's own objective, optimizer, schedule and gradient clipping,
in a plain loop (the stage's own decoder is not saved). Every `--every` steps it scores 8 batches of 32 passages in
eval mode three ways: the decoder given each passage's own h, the h of the previous passage of a shuffled batch
(rolled), and h = 0 (each figure a mean of the 8 batch means). own < rolled means the decoder reads the passage's
embedding; the same split by rare tokens (in at most 20 passages: names, numbers) and frequent ones (template words
and synonyms) says what it reads it for. (The miniature pretrains on its whole corpus, so the scored passages are
trained on too.)
"""
import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from benchutil import RESULTS, header, pretrain_with_probes, require_run_outputs, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of params/miniature/retromae.yaml")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, help="default: the stage's max_steps")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--decoder-mask", type=float, help="default: the stage's decoder_mask_ratio")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    stage = args.run_dir / f"pretrain_retromae_seed{args.seed}"
    needed = ["data", f"pretrain_base_seed{args.seed}/model", f"{stage.name}/train_config.yaml"]
    require_run_outputs(args.run_dir, needed, "miniature/retromae.yaml")

    import torch

    from reprolib.data import Corpus
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig, _optimizer, _schedule

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = TrainConfig.from_yaml(stage / "train_config.yaml")    # its model is the seed's MLM base
    changes = {"max_steps": args.steps, "decoder_mask_ratio": args.decoder_mask}
    config = dataclasses.replace(config, out_dir=tempfile.mkdtemp(), progress=False,
                                 **{k: v for k, v in changes.items() if v is not None})
    corpus = Corpus.open(config.train_data, progress=False)
    objective = build_objective(config, corpus)
    model, examples = objective.model, objective.examples
    optimizer = _optimizer(model, config)
    schedule = _schedule(optimizer, config, config.max_steps)
    # 8 batches of 32, shuffled so that a rolled h is mostly another entity's (an entity's four passages are
    # neighbours in the corpus)
    scored = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:256].tolist()
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
            for start in range(0, len(scored), 32):
                batch = examples.collate([examples[i] for i in scored[start:start + 32]])
                h = model.lm.bert(input_ids=batch["encoder_input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state[:, :1]
                labels = batch["decoder_labels"]
                for tokens, kept in (("", labels), ("_rare", only(labels, rare)), ("_frequent", only(labels, ~rare))):
                    for name, given in (("own", h), ("rolled", h.roll(1, dims=0)), ("zero", torch.zeros_like(h))):
                        if tokens and name == "zero":
                            continue
                        loss = model.decode(given, batch["decoder_input_ids"], batch["decoder_visibility"], kept)
                        totals[name + tokens] = totals.get(name + tokens, 0.0) + loss.item() / (len(scored) / 32)
        model.train()
        point = {k: round(v, 4) for k, v in totals.items()}
        for tokens in ("", "_rare", "_frequent"):
            point["rolled_minus_own" + tokens] = round(point["rolled" + tokens] - point["own" + tokens], 4)
        return point

    result = header("retromae_bottleneck")
    result.update(run_dir=str(args.run_dir), seed=args.seed, steps=config.max_steps,
                  decoder_mask=config.decoder_mask_ratio, learning_rate=config.learning_rate)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    started = time.perf_counter()
    result["curve"] = pretrain_with_probes(model, examples, order, optimizer, schedule, config.max_steps, args.every,
                                           decoder_losses, config.batch_size, config.max_grad_norm)
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = f"retromae_bottleneck_seed{args.seed}" + "".join(
        f"_{key}{value:g}" for key, value in (("steps", args.steps), ("mask", args.decoder_mask)) if value is not None)
    write_json(RESULTS / f"{name}.json", result)


if __name__ == "__main__":
    main()
