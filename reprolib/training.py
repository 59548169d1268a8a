"""One Accelerate training loop for every objective: contrastive and sparse fine-tuning, RetroMAE and
LexMAE pretraining (reprolib.objectives; docs/recipes.md §1, §2.3-2.5, §3, §4, §5).

    config (YAML or TrainConfig) -> objective: model + examples -> steps of
        [micro-batch: examples -> objective.loss -> backward] x grad_accum
        -> clip -> AdamW step -> schedule step
    -> out_dir/model, train_log.csv, tensorboard/, checkpoints/
       (with eval_steps: dev_eval.csv and best/, the model of the best dev evaluation; keep: best saves it as model/)

The same code runs in a notebook (one process), under `reprolib train CONFIG.yaml`, and under
`accelerate launch -m reprolib train CONFIG.yaml` on many GPUs or CPU processes. Each process takes
its own `batch_size` examples of a global batch; with `cross_device` the passages (and queries) of
every process are negatives for every query.

Resume: every `save_steps` the optimizer, schedule, model and RNG states are saved under
checkpoints/step-N. A re-run with the same config, input files and processes (`run_digest`) continues from the
newest one, with the same data order: an epoch's example order and each example (its group, its masks) depend only
on (seed, epoch, index).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import yaml

from reprolib.data.groups import WITHOUT_NEGATIVES
from reprolib.dev_eval import DevEval
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write, file_stamps
from reprolib.modeling.encoder import resolve_precision
from reprolib.objectives import OBJECTIVES, Contrastive

LOG_FILE = "train_log.csv"
SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.yaml"
BEST_DIR, DEV_FILE, DEV_LOG = "best", "dev_eval.json", "dev_eval.csv"   # keep: best (reprolib.dev_eval)
LOG_COLUMNS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "seconds", "examples_per_second")
SCHEDULES = ("linear", "constant")
DISTILLATIONS = ("kl", "kl_batchmean", "margin_mse")
RETRIEVERS = ("contrastive", "sparse")   # the objectives that train a retriever: in-batch negatives, dev search


@dataclasses.dataclass
class TrainConfig:
    # data: a file or a dataset directory each (MS MARCO, BEIR or LoTTE layout)
    model: str                            # HF name or path, sentence-transformers folder, or "scratch:<size>"
    out_dir: str
    train_data: str                       # dataset dir holding corpus, <split> queries and qrels (pretraining: the corpus)
    objective: str = "contrastive"        # contrastive | sparse | cross_encoder | retromae | lexmae (reprolib.objectives)
    negatives: str | list | None = None   # qid \t pid,pid,... ; default <train_data>/<split>.negatives.tsv; a list:
                                          # each query trained once per file (Tevatron's stage 2: mined + BM25)
    corpus: str | None = None             # default: train_data
    split: str = "train"
    template: str = "plain"               # passage text template (reprolib.data.templates); retromae_pretrain, lexmae
    # encoder (None: the checkpoint's own setting, else DenseEncoder's default)
    pooling: str | None = None
    normalize: bool | None = None
    projection_dim: int | None = None
    untie: bool = False
    t5_mode: str | None = None
    dropout: float | None = None          # every dropout probability (saved with the model); None: the checkpoint's
    query_max_len: int | None = None
    passage_max_len: int | None = None    # pretraining: the sequence length (default: the template's); cross_encoder: the pair's
    # groups and loss
    group_size: int = 8                   # 1 positive + G-1 negatives
    sampler: str = "retromae"             # retromae | tevatron
    sample_neg_from_topk: int = 200
    without_negatives: str = "random"     # a query with no negatives: random (RetroMAE) | skip (OpenMatch, LexMAE, Tevatron)
    per_query: bool | None = None         # one example per query (default for tevatron) or per qrels row
    temperature: float = 1.0
    cross_device: bool = False            # gather negatives from every process
    scale_loss_by_world_size: bool = True  # ×W with cross_device: Tevatron/OpenMatch/Disentangled yes, RetroMAE no
    gather_queries: bool = True           # with cross_device; LexMAE gathers the passages only
    false_negative_masking: bool = False  # Disentangled
    # distillation from teacher scores (contrastive and sparse): loss = distill + contrastive_weight x ranking CE
    teacher_scores: str | None = None     # qid pid score file, or sentence-transformers' scores .pkl.gz
    distillation: str | None = None       # kl (RetroMAE, mean over B*G) | kl_batchmean (LexMAE) | margin_mse
    contrastive_weight: float = 1.0       # RetroMAE 1e-4, LexMAE stage 3 0.2, Disentangled Margin-MSE 0
    # cross-encoder
    cross_encoder_loss: str = "listwise"  # listwise (CE over the group) | bce
    exact_match: bool | None = None       # DrQA's exact-match feature in the token types (modeling.cross_encoder);
                                          # None: the saved cross-encoder's own setting (a new one: off)
    # sparse (LexMAE fine-tuning: λ_d 0.002 stage 1, 0.008 stage 2; λ_q = 0.75 λ_d)
    flops_passage_weight: float = 0.002
    flops_query_weight: float | None = None   # default 0.75 x flops_passage_weight
    # pretraining
    encoder_mask_ratio: float = 0.3
    decoder_mask_ratio: float = 0.5
    decoder_layers: int = 2               # LexMAE (RetroMAE's enhanced decoder is one layer)
    bottleneck: str = "softmax"           # LexMAE: softmax | logits_sat
    bottleneck_layer_norm: bool = False   # LexMAE: b through the embeddings' LayerNorm (not in the recipe)
    decoder_loss_weight: float = 1.0      # 0: the MLM-only control (same masks, data and steps, no decoder)
    nsp_loss_weight: float = 0.0          # retromae objective: + BERT's next-sentence prediction (sentence pairs)
    pack: bool = False                    # RetroMAE: pack passages into blocks (Wikipedia); False: one per sequence (MS MARCO)
    new_head: str = "random"              # pretraining a checkpoint without an MLM head: random | identity (modeling.autoencoder)
    # optimisation
    batch_size: int = 16                  # queries (pretraining: sequences) per process per micro-batch
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None          # overrides epochs
    learning_rate: float = 2e-5
    encoder_learning_rate: float | None = None   # the checkpoint's body (HF base_model: embeddings, layers, pooler,
                                          # the tied MLM output projection); the rest (heads, projections,
                                          # decoders) keeps learning_rate. None: learning_rate; 0: frozen
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmup_steps: int = 0                 # overrides warmup_ratio when > 0
    schedule: str = "linear"              # linear | constant (after warmup)
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"           # no | fp16 | bf16 | auto (bf16 where native, else fp16 on a GPU, no on a CPU)
    gradient_checkpointing: bool = False
    # dev evaluation and the checkpoint kept (reprolib.dev_eval; LexMAE: every 10k steps, keep the best)
    eval_steps: int = 0                   # evaluate every N steps and at the end (0: never)
    eval_data: str | None = None          # dataset with the dev queries and qrels (None: train_data)
    eval_split: str = "dev"
    eval_candidates: str | None = None    # TREC run to rerank (e.g. BM25's); None: exact search of the corpus
    eval_depth: int = 1000                # hits per query: candidates reranked, or kept from an exact search
    eval_max_queries: int | None = None   # the first N judged dev queries (qid order)
    eval_metric: str = "RR@10"
    keep: str = "last"                    # the model saved: last | best (by eval_metric)
    # bookkeeping
    seed: int = 42
    save_steps: int = 0                   # checkpoint every N steps (0: only the final model)
    save_total_limit: int = 2
    log_steps: int = 1
    tensorboard: bool = True
    progress: bool = True

    @classmethod
    def from_dict(cls, data, source="config"):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ReprolibError(f"{source}: unknown training option(s) {', '.join(unknown)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ReprolibError(f"{source}: missing training option(s) {', '.join(missing)}")
        config = cls(**{name: _typed(cls, name, value, source) for name, value in data.items()})
        config.check(source)
        return config

    @classmethod
    def from_params(cls, params, **overrides):
        """The config of a notebook: every option named in `params` (a notebook passes `globals()`, whose
        parameters carry the options' own names), then `overrides`; checked. Values that are not plain data
        (a module, a Corpus a rerun cell left behind) are not options; a Path becomes its text."""
        names = {f.name for f in dataclasses.fields(cls)}
        plain = (str, int, float, bool, list, dict, type(None))
        options = {name: str(value) if isinstance(value, Path) else value for name, value in params.items()
                   if name in names and isinstance(value, (*plain, Path))}
        return cls.from_dict({**options, **overrides}, source="notebook parameters")

    @classmethod
    def from_yaml(cls, path):
        path = Path(path)
        if not path.is_file():
            raise ReprolibError(f"{path}: training config not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ReprolibError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ReprolibError(f"{path}: expected a mapping of training options")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self, path):
        with atomic_write(path) as f:
            yaml.safe_dump(dataclasses.asdict(self), f, sort_keys=False)
        return Path(path)

    def __post_init__(self):
        if self.flops_query_weight is None:
            self.flops_query_weight = 0.75 * self.flops_passage_weight
        if self.encoder_learning_rate is not None:   # 0 and 0.0 (as the saved YAML reads back): one digest
            self.encoder_learning_rate = float(self.encoder_learning_rate)

    def check(self, source="config"):
        for name in ("batch_size", "grad_accum", "epochs", "group_size", "sample_neg_from_topk"):
            if getattr(self, name) < 1:
                raise ReprolibError(f"{source}: {name} must be at least 1, not {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ReprolibError(f"{source}: dropout must be in [0, 1), not {self.dropout}")
        if not self.learning_rate > 0:
            raise ReprolibError(f"{source}: learning_rate must be > 0, not {self.learning_rate}")
        if self.encoder_learning_rate is not None and not self.encoder_learning_rate >= 0:
            raise ReprolibError(f"{source}: encoder_learning_rate must be >= 0, not {self.encoder_learning_rate}")
        if self.objective not in OBJECTIVES:
            raise ReprolibError(f"{source}: objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.bottleneck not in ("softmax", "logits_sat"):
            raise ReprolibError(f"{source}: bottleneck must be softmax or logits_sat, not {self.bottleneck!r}")
        if self.new_head not in ("random", "identity"):
            raise ReprolibError(f"{source}: new_head must be random or identity, not {self.new_head!r}")
        for name in ("decoder_loss_weight", "nsp_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ReprolibError(f"{source}: {name} must be >= 0, not {getattr(self, name)}")
        if self.nsp_loss_weight and (self.objective != "retromae" or self.pack or self.decoder_loss_weight):
            raise ReprolibError(f"{source}: next-sentence prediction (nsp_loss_weight) builds a BERT: the retromae "
                                "objective with decoder_loss_weight 0 and pack false, pairing one passage's sentences")
        for name in ("encoder_mask_ratio", "decoder_mask_ratio"):
            if not 0 < getattr(self, name) < 1:
                raise ReprolibError(f"{source}: {name} must be between 0 and 1, not {getattr(self, name)}")
        if self.objective == "lexmae" and self.decoder_mask_ratio < self.encoder_mask_ratio:
            raise ReprolibError(f"{source}: LexMAE's decoder masks the encoder's positions and more: decoder_mask_ratio "
                                f"{self.decoder_mask_ratio} must be at least encoder_mask_ratio {self.encoder_mask_ratio}")
        if self.pack and self.objective != "retromae":
            raise ReprolibError(f"{source}: pack builds RetroMAE's blocks of text; the {self.objective} objective "
                                "takes one passage a sequence")
        if self.distillation not in (None, *DISTILLATIONS):
            raise ReprolibError(f"{source}: distillation must be one of {', '.join(DISTILLATIONS)}, not {self.distillation!r}")
        if bool(self.distillation) != bool(self.teacher_scores):
            raise ReprolibError(f"{source}: distillation and teacher_scores go together (got distillation="
                                f"{self.distillation!r}, teacher_scores={self.teacher_scores!r})")
        if isinstance(self.negatives, list):
            if not self.negatives or not all(isinstance(path, str) and path for path in self.negatives):
                raise ReprolibError(f"{source}: negatives must be a file or a list of files, not {self.negatives!r}")
            if self.teacher_scores:
                raise ReprolibError(f"{source}: distillation reads one negatives file, not a list")
        if self.distillation and self.objective not in RETRIEVERS:
            raise ReprolibError(f"{source}: distillation trains a contrastive or sparse retriever, not {self.objective!r}")
        if self.keep not in ("last", "best"):
            raise ReprolibError(f"{source}: keep must be last or best, not {self.keep!r}")
        if self.keep == "best" and not self.eval_steps > 0:
            raise ReprolibError(f"{source}: keep: best needs dev evaluations (eval_steps > 0)")
        if self.cross_device and self.objective not in RETRIEVERS:
            raise ReprolibError(f"{source}: cross_device gathers a retriever's in-batch negatives, not the "
                                f"{self.objective} objective's")
        if self.eval_steps and self.objective not in RETRIEVERS:
            raise ReprolibError(f"{source}: dev evaluation (eval_steps) scores retrievers, not the {self.objective} objective")
        if self.without_negatives not in WITHOUT_NEGATIVES:
            raise ReprolibError(f"{source}: without_negatives must be one of {', '.join(WITHOUT_NEGATIVES)}, "
                                f"not {self.without_negatives!r}")
        if self.cross_encoder_loss not in ("listwise", "bce"):
            raise ReprolibError(f"{source}: cross_encoder_loss must be listwise or bce, not {self.cross_encoder_loss!r}")
        if self.exact_match and self.objective != "cross_encoder":
            raise ReprolibError(f"{source}: exact_match is a cross-encoder's input feature, not the {self.objective} objective's")
        if self.schedule not in SCHEDULES:
            raise ReprolibError(f"{source}: schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16", "auto"):
            raise ReprolibError(f"{source}: mixed_precision must be no, fp16, bf16 or auto, not {self.mixed_precision!r}")
        for name in ("max_steps", "warmup_steps", "eval_steps", "save_steps"):   # 0: none (max_steps: the epochs)
            if (getattr(self, name) or 0) < 0:
                raise ReprolibError(f"{source}: {name} must be at least 0, not {getattr(self, name)}")
        for name in ("log_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ReprolibError(f"{source}: {name} must be at least 1, not {getattr(self, name)}")
        if not self.temperature > 0:
            raise ReprolibError(f"{source}: temperature must be > 0, not {self.temperature}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ReprolibError(f"{source}: warmup_ratio must be in [0, 1], not {self.warmup_ratio}")

    def digest(self):
        """Hash of the options that change the trained weights (not logging or progress options); `run_digest` adds
        the input files and the number of processes."""
        data = dataclasses.asdict(self)
        for key in ("out_dir", "save_steps", "save_total_limit", "log_steps", "tensorboard", "progress"):
            data.pop(key)
        for key, unset in ADDED_LATER.items():    # unset, they leave the digests of existing runs as they were
            if data[key] == unset:
                data.pop(key)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# options added after runs were trained, with their unset values: unset, they are left out of `digest`
ADDED_LATER = {"dropout": None, "bottleneck_layer_norm": False, "nsp_loss_weight": 0.0, "encoder_learning_rate": None,
               "exact_match": None}
INPUTS = ("model", "train_data", "corpus", "negatives", "teacher_scores", "eval_data", "eval_candidates")


def run_digest(config, world):
    """What a trained model in out_dir is of: the config, the number of processes (the global batch and the
    cross-device negatives depend on it) and the files the config names, by size and modification time. A teacher
    rescored, or negatives mined again, into the same path is another training: a finished one is not skipped, nor a
    checkpoint of it resumed."""
    from reprolib.modeling.specs import local_source

    files = []
    for key in INPUTS:
        values = getattr(config, key)
        for value in values if isinstance(values, list) else [values]:
            path = Path(local_source(str(value))) if value else None
            if path is not None and path.exists():   # not unset, a hub name or "scratch:<size>"
                files += [f"{key}:{name}:{size}:{mtime}" for name, size, mtime in file_stamps(path, config.out_dir)]
    blob = json.dumps({"config": config.digest(), "processes": world, "inputs": files})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finished_training(out_dir, digest, config, log):
    """The summary of this training when out_dir holds it finished; else None, after clearing a finished training of
    another config or other inputs (its summary and checkpoints: nothing of it is to be resumed)."""
    path = Path(out_dir) / SUMMARY_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if _of_this_training(summary, digest, config):
        log(f"{out_dir} already holds a model trained with this config and input files; skipping")
        return summary
    log(f"{out_dir} holds a model trained with another config or other input files; training again")
    path.unlink()
    shutil.rmtree(Path(out_dir) / "checkpoints", ignore_errors=True)
    return None


def _of_this_training(record, digest, config):
    """Whether a summary or checkpoint `record` is of this training. One written before run digests were recorded
    has only its config's digest: the same config counts as the same training, as it did then."""
    if "run_digest" in record:
        return record["run_digest"] == digest
    return record.get("config_digest") == config.digest()


# ---------------------------------------------------------------------------- setup

def _optimizer(model, config):
    """AdamW over the trainable parameters, without decay on biases and LayerNorm. With `encoder_learning_rate`
    the transformer body gets its own rate (the schedule scales both alike); at 0 it is frozen (requires_grad
    off, left so on the model), so its backward is skipped."""
    import torch

    body = _body_parameters(model) if config.encoder_learning_rate is not None else set()
    if config.encoder_learning_rate == 0:
        for param in model.parameters():
            if id(param) in body:
                param.requires_grad_(False)
    # (in the body, no decay) -> parameters, in the order of the keys: the rest first, so the log's rate is
    # learning_rate; unset, these are the two groups of before, in their order, so older checkpoints resume
    groups = {key: [] for key in ((False, False), (False, True), (True, False), (True, True))}
    for param in model.parameters():
        if param.requires_grad:
            groups[id(param) in body, param.ndim < 2].append(param)
    if body and not groups[False, False] + groups[False, True]:
        raise ReprolibError("encoder_learning_rate: this model has no head, projection or decoder outside the "
                            "checkpoint's body to train at learning_rate; set learning_rate instead")
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": 0.0 if no_decay else config.weight_decay,
          "lr": config.encoder_learning_rate if in_body else config.learning_rate}
         for (in_body, no_decay), params in groups.items() if params], lr=config.learning_rate)


def _body_parameters(model):
    """ids of the parameters of every transformers model's body (its `base_model`: BertForMaskedLM's `bert`,
    a BertModel itself), not of the heads, projections and decoders around it. A head tied to the word
    embeddings (the MLM output projection) shares their parameter, so it is in the body."""
    from transformers import PreTrainedModel

    return {id(param) for module in model.modules() if isinstance(module, PreTrainedModel)
            for param in module.base_model.parameters()}


def _schedule(optimizer, config, total_steps):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    if config.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def forward_backward(objective, model, items, config, accelerator):
    """Loss and gradients of one micro-batch; returns the loss and its parts as floats, scaled by 1/grad_accum."""
    loss, parts = objective.loss(model, items, accelerator.device)
    accelerator.backward(loss / config.grad_accum)
    return loss.item() / config.grad_accum, {k: v / config.grad_accum for k, v in parts.items()}


# ---------------------------------------------------------------------------- checkpoints

def _checkpoints(out_dir):
    root = Path(out_dir) / "checkpoints"
    found = [(int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "trainer_state.json").exists()]
    return [p for _, p in sorted(found)]


def _main_decides(processes, decide, default):
    """`decide()`, run by the main process alone, its result given to every process (the others get `default`
    meanwhile). An error it raises is raised by every process, not by the main one alone while the others wait."""
    result, error = default, None
    if processes.is_main_process:
        try:
            result = decide()
        except Exception as e:
            error = e
    if processes.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result


_PRECISION_NAMES = {"no": "float32"}


def _resume_point(out_dir, digest, config, accelerator):
    """(the checkpoint to resume from, its step), or (None, 0). The main process picks it, as it decides whether
    the training is finished: every process must start at the same step, and on several machines a process whose
    out_dir is its own machine's disk would otherwise start from step 0 (or from another checkpoint) while the
    others resume."""
    def last_checkpoint():
        checkpoints = _checkpoints(out_dir)
        if not checkpoints:
            return None, None
        state = _read_json(checkpoints[-1] / "trainer_state.json")
        if not _of_this_training(state, digest, config):
            raise ReprolibError(f"{checkpoints[-1]} was written by a different training config, input files or "
                                "number of processes; use a fresh out_dir or delete its checkpoints/")
        # "auto" is in the digest unresolved: a run moved to a machine where it resolves otherwise must not
        # continue its checkpoint in another precision (checkpoints written before this was recorded are trusted)
        if state.get("precision", accelerator.mixed_precision) != accelerator.mixed_precision:
            then, now = (_PRECISION_NAMES.get(p, p) for p in (state["precision"], accelerator.mixed_precision))
            raise ReprolibError(f"{checkpoints[-1]} was trained in {then}, but mixed_precision {config.mixed_precision}"
                                f" is {now} on this machine; resume it where it is {then}, or delete its checkpoints/")
        return checkpoints[-1].name, state

    name, state = _main_decides(accelerator, last_checkpoint, (None, None))
    if name is None:
        return None, 0
    checkpoint = Path(out_dir) / "checkpoints" / name
    if accelerator.num_processes > 1:   # each reads its own copy: is it the one the main process resumes from?
        from accelerate.utils import gather_object
        try:
            seen = _read_json(checkpoint / "trainer_state.json")
        except (OSError, ValueError):
            seen = None
        blind = [rank for rank, same in enumerate(gather_object([seen == state])) if not same]
        if blind:
            raise ReprolibError(f"{checkpoint}: process(es) {', '.join(map(str, blind))} cannot read the checkpoint "
                                "the main process resumes from; to resume on several machines, out_dir must be on a "
                                "disk they all read")
    return checkpoint, state["step"]


def _save_checkpoint(accelerator, out_dir, step, digests, limit):
    path = Path(out_dir) / "checkpoints" / f"step-{step:07d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()   # every process's random states written (save_state does not wait)
    if accelerator.is_main_process:
        # written last: a checkpoint folder without it is incomplete and ignored by resume
        with atomic_write(path / "trainer_state.json") as f:
            f.write(json.dumps({"step": step, **digests, "precision": accelerator.mixed_precision}) + "\n")
        for old in _checkpoints(out_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------- the loop

def train(config, num_processes=1, log=print, **machines):
    """Train the config's objective; returns the summary dict (also in out_dir/train_summary.json).

    With `num_processes` > 1 (all machines together) or `num_machines` > 1 the training runs under `accelerate
    launch` in a subprocess: see `launch` for `machines` (num_machines, machine_rank, main_process_ip, ...)."""
    config.check()   # a TrainConfig built in code, not read from a YAML, is checked too
    if num_processes > 1 or machines.get("num_machines", 1) > 1:
        return launch(config, num_processes, log=log, **machines)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from reprolib.progress import tqdm

    from reprolib.data.groups import epoch_order
    from reprolib.index import process_state
    from reprolib.objectives import build_objective

    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(dict(config))
    out_dir = Path(config.out_dir)
    processes = process_state()   # the process group: one process, or gloo CPU processes / GPUs under `accelerate launch`

    def digest_and_finished():   # one decides for all: machines with copies of the data see other mtimes
        digest = run_digest(config, processes.num_processes)
        return digest, _finished_training(out_dir, digest, config, log)

    digest, finished = _main_decides(processes, digest_and_finished, (None, None))
    if finished is not None:
        return finished
    digests = {"config_digest": config.digest(), "run_digest": digest}   # both recorded: see _of_this_training

    # Accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    # notebook kernel (or a test session) that trains twice must be able to change it. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=resolve_precision(config.mixed_precision, processes.device))
    main = accelerator.is_main_process
    world = accelerator.num_processes
    set_seed(config.seed)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(out_dir / CONFIG_FILE)

    from reprolib.data import Corpus
    with accelerator.main_process_first():   # the corpus store and a scratch model are built once, by the main process
        corpus = Corpus.open(config.corpus or config.train_data, progress=False)
        objective = build_objective(config, corpus)
    examples = objective.examples
    if config.gradient_checkpointing:
        objective.model.gradient_checkpointing_enable()

    global_batch = config.batch_size * world
    micro_per_epoch = len(examples) // global_batch        # drop_last: every process gets a full micro-batch
    steps_per_epoch = micro_per_epoch // config.grad_accum
    if steps_per_epoch == 0:
        raise ReprolibError(f"{len(examples)} training examples are fewer than one step of "
                            f"{global_batch * config.grad_accum} (batch_size x processes x grad_accum)")
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    optimizer = _optimizer(objective.model, config)
    scheduler = _schedule(optimizer, config, total_steps)
    model, optimizer = accelerator.prepare(objective.model, optimizer)
    accelerator.register_for_checkpointing(scheduler)   # stepped by us once per optimizer step, not per process

    checkpoint, start_step = _resume_point(out_dir, digest, config, accelerator)
    if checkpoint:
        accelerator.load_state(str(checkpoint))
        log(f"resuming from {checkpoint} (step {start_step} of {total_steps})")
    if main:
        per_example = f" x {config.group_size} passages" if isinstance(objective, Contrastive) else ""
        log(f"{config.objective}: {len(examples):,} examples, {steps_per_epoch:,} steps per epoch, {total_steps:,} "
            f"steps; global batch {global_batch * config.grad_accum}{per_example} on {world} process(es) "
            f"({accelerator.device}, {accelerator.mixed_precision})")

    dev = DevEval(config, corpus) if config.eval_steps and main else None
    best = None   # the best dev evaluation so far: a resume continues from the one on disk, a new run clears it
    if main and start_step:
        best = _resume_dev(out_dir, start_step)
    elif main:
        for stale in (BEST_DIR, BEST_DIR + ".partial"):
            shutil.rmtree(out_dir / stale, ignore_errors=True)
        (out_dir / DEV_LOG).unlink(missing_ok=True)

    columns = LOG_COLUMNS + objective.loss_parts
    writer = _Logger(out_dir, columns, resume_step=start_step, tensorboard=config.tensorboard) if main else None
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", mininterval=1.0,
               disable=not (config.progress and main))
    rank = accelerator.process_index
    started = time.perf_counter()
    order = None
    model.train()
    try:
        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            step_loss, step_parts = 0.0, dict.fromkeys(objective.loss_parts, 0.0)
            for micro in range(config.grad_accum):
                index = step * config.grad_accum + micro
                epoch, slot = divmod(index, micro_per_epoch)
                if epoch != examples.epoch or order is None:
                    examples.set_epoch(epoch)
                    order = epoch_order(len(examples), epoch, config.seed)
                first = slot * global_batch + rank * config.batch_size
                items = [examples[int(i)] for i in order[first:first + config.batch_size]]
                last = micro == config.grad_accum - 1
                with nullcontext() if last else accelerator.no_sync(model):   # DDP syncs on the last one only
                    loss, parts = forward_backward(objective, model, items, config, accelerator)
                step_loss += loss
                for key, value in parts.items():
                    step_parts[key] += value
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)   # drawn at the bar's own interval
            if writer and (done % config.log_steps == 0 or done == total_steps):
                seconds = time.perf_counter() - step_start
                writer.write(step=done, epoch=round(done / steps_per_epoch, 4), loss=step_loss,
                             learning_rate=scheduler.get_last_lr()[0], grad_norm=grad_norm, seconds=round(seconds, 4),
                             examples_per_second=round(global_batch * config.grad_accum / seconds, 2), **step_parts)
            if config.eval_steps and (done % config.eval_steps == 0 or done == total_steps):
                if dev:
                    best = _evaluate(dev, objective, accelerator.unwrap_model(model), done, best, out_dir, log)
                accelerator.wait_for_everyone()
            if config.save_steps and done % config.save_steps == 0 and done < total_steps:
                _save_checkpoint(accelerator, out_dir, done, digests, config.save_total_limit)
    finally:
        bar.close()
        if writer:
            writer.close()

    accelerator.wait_for_everyone()
    summary = {**digests, "objective": config.objective, "steps": total_steps,
               "epochs": round(total_steps / steps_per_epoch, 4), **objective.summary(),
               "processes": world, "global_batch": global_batch * config.grad_accum,
               "seconds": round(time.perf_counter() - started, 2),
               "resumed_from_step": start_step, "device": str(accelerator.device)}
    if best:
        summary.update(kept=config.keep, best_step=best["step"], **{f"best_dev_{best['metric']}": best["value"]})
    if main:
        if config.keep == "best" and best:
            shutil.rmtree(out_dir / "model", ignore_errors=True)
            shutil.copytree(out_dir / BEST_DIR, out_dir / "model", ignore=shutil.ignore_patterns(DEV_FILE))
        else:
            objective.save(accelerator.unwrap_model(model), out_dir / "model")
        with atomic_write(out_dir / SUMMARY_FILE) as f:
            json.dump(summary, f, indent=2)
        log(f"saved {out_dir / 'model'} after {total_steps} steps ({summary['seconds']} s)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _evaluate(dev, objective, model, step, best, out_dir, log):
    """Evaluate on the dev queries, append to dev_eval.csv, and save the model to best/ when it is the best
    so far; returns the best evaluation ({step, metric, value})."""
    value = dev(model)
    path = out_dir / DEV_LOG
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        if new_file:
            f.write(f"step,{dev.metric}\n")
        f.write(f"{step},{value}\n")
    log(f"step {step}: dev {dev.metric} {value:.4f}" + (f" (best {best['value']:.4f} at step {best['step']})" if best else ""))
    if best is None or value > best["value"]:
        best = {"step": step, "metric": dev.metric, "value": value}
        partial = out_dir / (BEST_DIR + ".partial")   # complete before it replaces the previous best
        shutil.rmtree(partial, ignore_errors=True)
        objective.save(model, partial)
        (partial / DEV_FILE).write_text(json.dumps(best))
        shutil.rmtree(out_dir / BEST_DIR, ignore_errors=True)
        partial.rename(out_dir / BEST_DIR)
    return best


def _resume_dev(out_dir, step):
    """The best dev evaluation to resume from at `step`: a best/.partial that was complete (its dev_eval.json is
    written last) when a crash stopped it replacing best/ takes its place, and dev_eval.csv drops the rows of the
    steps that will be evaluated again."""
    partial, best = out_dir / (BEST_DIR + ".partial"), out_dir / BEST_DIR
    if (partial / DEV_FILE).exists():
        shutil.rmtree(best, ignore_errors=True)
        partial.rename(best)
    shutil.rmtree(partial, ignore_errors=True)
    log = out_dir / DEV_LOG
    if log.exists():
        header, *rows = log.read_text().splitlines(keepends=True)
        with atomic_write(log, keep_unchanged=False) as f:   # appended to below: a file of its own
            f.write(header + "".join(row for row in rows if int(row.split(",")[0]) <= step))
    return _read_json(best / DEV_FILE)


def _read_json(path):
    return json.loads(path.read_text()) if path.exists() else None


class _Logger:
    """train_log.csv (appended across resumes) and, when tensorboard is installed, event files."""

    def __init__(self, out_dir, columns, resume_step=0, tensorboard=True):
        self.path = Path(out_dir) / LOG_FILE
        self.columns = columns
        rows = read_log(self.path) if self.path.exists() else []
        rows = [r for r in rows if r["step"] <= resume_step]      # drop steps that will be redone
        with atomic_write(self.path, keep_unchanged=False) as f:   # appended to below: a file of its own
            out = csv.DictWriter(f, columns, extrasaction="ignore")
            out.writeheader()
            out.writerows(rows)
        self.file = open(self.path, "a", newline="")
        self.csv = csv.DictWriter(self.file, columns)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, **row):
        self.csv.writerow(row)
        self.file.flush()
        if self.tb:
            for key in ("loss", "learning_rate", "grad_norm", "examples_per_second", *self.columns[len(LOG_COLUMNS):]):
                if row.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self):
        self.file.close()
        if self.tb:
            self.tb.close()


def read_log(path):
    """Rows of a train_log.csv as dicts of numbers (None for empty cells)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) else None) for k, v in row.items()})
            rows[-1]["step"] = int(rows[-1]["step"])
    return rows


def final_losses(log, **columns):
    """{name: the mean of log column `column` over the last tenth of the logged steps}, e.g.
    final_losses(log, train_loss="loss"): where a run ended, with less noise than its last step alone."""
    tail = log[-max(1, len(log) // 10):]
    return {name: sum(row[column] for row in tail) / len(tail) for name, column in columns.items()}


# ---------------------------------------------------------------------------- many processes from a notebook

LAUNCH_OPTIONS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def launch_options(params):
    """The launch settings among a notebook's parameters (`globals()`): train(config, **launch_options(globals()))."""
    return {name: params[name] for name in LAUNCH_OPTIONS if name in params}


def launch(config, num_processes=2, cpu=None, log=print, extra_args=(), num_machines=1, machine_rank=0,
           main_process_ip=None, main_process_port=29500):
    """Run `accelerate launch -m reprolib train CONFIG` in a subprocess, streaming its output to `log`.

    `train(config, num_processes)` calls this for multi-GPU (or multi-process CPU) training, so that a
    notebook's kernel never initialises CUDA: only the worker processes do. `config` is a TrainConfig or a YAML path.

    Several machines: `num_processes` counts them all (2 machines x 8 GPUs: 16), and each machine runs the same
    launch with its own `machine_rank` (0 .. num_machines - 1) and machine 0's address and a free port as
    `main_process_ip` / `main_process_port`. The processes then train as one, and machine 0 writes the model
    and the summary (on a filesystem the machines share, or on machine 0's); the others return None. Resuming
    needs the shared filesystem: each process must read the checkpoint machine 0 resumes from.
    """
    if isinstance(config, TrainConfig):
        path = config.to_yaml(Path(config.out_dir) / CONFIG_FILE)
    else:
        path = Path(config)
    command = accelerate_command(num_processes, cpu, num_machines, machine_rank, main_process_ip, main_process_port)
    command += [*extra_args, "-m", "reprolib", "train", str(path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    cause = None
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            log(line)
            if cause is None and ("Error:" in line or line.startswith("error:")):
                cause = line.split("]: ", 1)[-1]      # the first error a worker printed, without its rank tag
    except BaseException:   # an interrupted stage: its workers must not train on, orphaned (accelerate stops them)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if process.wait() != 0:
        raise ReprolibError(f"training failed (exit {process.returncode}): {cause or ' '.join(command)}")
    if machine_rank > 0:
        return None
    return json.loads((Path(TrainConfig.from_yaml(path).out_dir) / SUMMARY_FILE).read_text())


def accelerate_command(num_processes=1, cpu=None, num_machines=1, machine_rank=0, main_process_ip=None,
                       main_process_port=29500):
    """`python -m accelerate.commands.launch ...` for this machine's share of `num_processes` (all machines
    together); append `-m reprolib <verb> ...` to it. CPU processes talk over gloo."""
    if num_machines < 1 or not 0 <= machine_rank < num_machines or num_processes % num_machines:
        raise ReprolibError(f"launch: {num_processes} processes on {num_machines} machines (machine_rank "
                            f"{machine_rank}): num_processes must be a multiple of num_machines, 0 <= rank < machines")
    if num_machines > 1 and not main_process_ip:
        raise ReprolibError("launch: several machines need main_process_ip, the address of machine 0")
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", str(num_machines), "--dynamo_backend", "no", "--mixed_precision", "no"]
    if num_machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", main_process_ip,
                    "--main_process_port", str(main_process_port)]
    if num_processes > 1:
        command.append("--multi_gpu")   # accelerate's name for its torchrun launcher, CPU or GPU
    elif cpu:
        command.append("--cpu")
    return command


def _typed(cls, name, value, source):
    """A YAML value as the option's type (an int for an int option, ...), or a one-line error: `batch_size:
    eight` must not reach the training loop."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    kinds = str(field.type)
    if value is None:
        if "None" in kinds:
            return None
        raise ReprolibError(f"{source}: {name} must not be empty")
    for kind, convert in (("int", int), ("float", float)):
        if kinds.startswith(kind):
            number = value
            if isinstance(value, str):   # YAML reads 2e-5 (no dot) as a string
                try:
                    number = float(value)
                except ValueError:
                    number = None
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                    or (kind == "int" and number != int(number)):
                raise ReprolibError(f"{source}: {name} must be {'an integer' if kind == 'int' else 'a number'}, "
                                    f"not {value!r}")
            return convert(number)
    if kinds.startswith("bool") and not isinstance(value, bool):
        raise ReprolibError(f"{source}: {name} must be true or false, not {value!r}")
    if kinds.startswith("str") and not isinstance(value, str) and not (" list" in kinds and isinstance(value, list)):
        raise ReprolibError(f"{source}: {name} must be a string{' or a list' if ' list' in kinds else ''}, not {value!r}")
    return value
