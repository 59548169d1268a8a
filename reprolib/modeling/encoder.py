"""What the dense and the sparse encoder share: tokenizing texts (or text pairs) with dynamic padding,
length-sorted buckets for training, `forward(query=..., passage=...)`, and the batched inference loop.

A subclass sets `kind` and defines `embed(batch, side)` (vectors of a tokenized batch, with autograd),
`_backbones()` (the HF models to checkpoint) and `_encode(texts, side, ...)` (how the inference loop's
batches become the returned matrix: a numpy array for dense, a scipy CSR matrix for sparse).

Folders written by `save` hold a `reprolib_encoder.json` whose "kind" says which class loads them
(`reprolib.modeling.load_encoder`); a folder without one is a plain HF model (dense by default).
"""
from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reprolib import cpu
from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write

CONFIG_NAME = "reprolib_encoder.json"
SIDES = ("query", "passage")


def native_bf16(device):
    """Whether `device` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with avx512_bf16 or AMX
    that oneDNN may use (`reprolib.cpu.native_bf16`). On an AVX2-only CPU bf16 is emulated, and slower."""
    device = torch.device(device)
    if device.type == "cuda":   # Ampere and newer; is_bf16_supported() also counts emulation on older GPUs
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu.native_bf16()


# the endings of the config fields that hold a dropout probability (BERT's hidden_dropout_prob, T5's dropout_rate,
# DistilBERT's dropout, DeBERTa's pooler_dropout, GPT-2's resid_pdrop, ...)
DROPOUT_SUFFIXES = ("dropout", "dropout_prob", "dropout_rate", "_pdrop")


def set_dropout(config, p):
    """Set every dropout probability of an HF `config` to `p` and return it; p None keeps the checkpoint's own.
    Pass the config to `from_pretrained` before the model is built: attention layers read it once, at init. A model
    trained so saves the config, and with it `p`, as its own."""
    if p is not None:
        for field, value in vars(config).items():
            # a None value means "use another field's" (BERT's classifier_dropout)
            if field.endswith(DROPOUT_SUFFIXES) and isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(config, field, float(p))
    return config


def resolve_precision(precision, device):
    """"auto" -> "bf16" where `device` has native bf16, "fp16" on an older GPU, "no" on other CPUs; any other
    value is returned as it is."""
    if precision != "auto":
        return precision
    if native_bf16(device):
        return "bf16"
    return "fp16" if torch.device(device).type == "cuda" else "no"


def autocast(precision, device):
    """torch.autocast for inference in "fp16" or "bf16" (weights stay fp32, matmuls run in half precision);
    None or "no": a no-op context; "auto": see `resolve_precision`. On a CPU with avx512_bf16, bf16 scores
    cross-encoder pairs 1.7x faster (bench/README.md)."""
    precision = resolve_precision(precision, device)
    if precision in (None, "no"):
        return contextlib.nullcontext()
    if precision not in ("fp16", "bf16"):
        raise ReprolibError(f"precision must be no, fp16, bf16 or auto, not {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type == "cpu":
        # most CPUs have no fast fp16 matmul (slower than fp32, and it can overflow): refuse rather than mislead
        raise ReprolibError("fp16 needs a GPU (this process runs on the CPU); use bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def autocast_precision(device):
    """The precision an enclosing torch.autocast runs `device`'s matmuls in: "bf16" or "fp16", else "no". Recorded
    with an index and with teacher scores, so that a resume under another precision starts afresh rather than
    mixing the two in one file."""
    probe = torch.ones(1, 1, device=device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get((probe @ probe).dtype, "no")


def _check_tokenizer(model, tokenizer):
    """Refuse a tokenizer that cannot be the model's: a folder without its tokenizer files can load one with a
    handful of tokens, which turns every word into [UNK] and trains or indexes nonsense without an error.
    Embedding matrices are often padded (T5: 32,128 rows for 32,100 tokens), so only a large gap is refused."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) < 0.9 * rows:
        where = getattr(model.config, "_name_or_path", "") or "the model"
        raise ReprolibError(f"{where}: the tokenizer has {len(tokenizer):,} tokens but the model embeds {rows:,}; "
                            "are the tokenizer files (vocab.txt, tokenizer.json, ...) missing from the folder?")


class TextEncoder(nn.Module):
    kind = None

    def __init__(self, model, tokenizer, query_max_len, passage_max_len):
        """`model`: the HF module that takes the tokenized batch (its forward's arguments decide whether
        token_type_ids are passed)."""
        super().__init__()
        _check_tokenizer(model, tokenizer)
        self.tokenizer = tokenizer
        self.query_max_len = int(query_max_len)
        self.passage_max_len = int(passage_max_len)
        accepted = inspect.signature(model.forward).parameters
        self._input_keys = {"input_ids", "attention_mask"} | ({"token_type_ids"} & set(accepted))

    @property
    def device(self):
        return next(self.parameters()).device

    def describe(self):
        """One line for a notebook: the encoder, its settings, backbone and size (the module repr runs to pages)."""
        backbone = getattr(getattr(self._backbones()[0], "config", None), "model_type", "?")
        return (f"{type(self).__name__}({self.extra_repr()}) on a {backbone} backbone, "
                f"{sum(p.numel() for p in self.parameters()):,} parameters")

    @property
    def sep_token(self):
        """What a template's `{sep}` becomes for this tokenizer ("[SEP]" for BERT, "</s>" for RoBERTa/T5)."""
        return self.tokenizer.sep_token or self.tokenizer.eos_token or " "

    def max_len(self, side):
        if side not in SIDES:
            raise ValueError(f"side must be 'query' or 'passage', not {side!r}")
        return self.query_max_len if side == "query" else self.passage_max_len

    # ------------------------------------------------------------------ training-time API
    def forward(self, query=None, passage=None):
        """(query vectors or None, passage vectors or None); call the (DDP-wrapped) module like this in training.

        `query` / `passage` is a tokenized batch, or a `Buckets` of them (from `tokenize_buckets`), whose
        vectors come back in the original text order.
        """
        return self._embed_any(query, "query"), self._embed_any(passage, "passage")

    def _embed_any(self, batch, side):
        if batch is None:
            return None
        if isinstance(batch, Buckets):
            reps = torch.cat([self.embed(chunk, side) for chunk in batch.chunks])
            return reps[batch.inverse.to(reps.device)]
        return self.embed(batch, side)

    def _model_inputs(self, batch):
        return {k: v for k, v in batch.items() if k in self._input_keys}

    def tokenize(self, texts, side="query", max_length=None):
        """Tokenize a training batch: dynamic padding (to the longest text)."""
        first, second = _split_pairs(texts)
        enc = self.tokenizer(first, second, truncation=True, max_length=self._clip(max_length or self.max_len(side)),
                             padding=True, return_tensors="pt")
        return self._model_inputs(enc)

    def tokenize_buckets(self, texts, side="passage", bucket_size=16, max_length=None):
        """Tokenize a training batch into length-sorted buckets of `bucket_size` texts, each padded only to its
        own longest text: less padding than one batch padded to the longest of all (what `forward` undoes)."""
        feats, lengths, order = self._tokenize_by_length(texts, self._clip(max_length or self.max_len(side)))
        chunks = [self._pad(feats, order[b:b + bucket_size], lengths) for b in range(0, len(order), bucket_size)]
        return Buckets(chunks, torch.from_numpy(np.argsort(order)))

    def _tokenize_by_length(self, texts, max_length):
        """Unpadded token lists of `texts`, their lengths, and the order longest first (stable)."""
        first, second = _split_pairs(texts)
        feats = self.tokenizer(first, second, truncation=True, max_length=max_length, padding=False)
        feats = {k: feats[k] for k in feats.keys() if k in self._input_keys}
        lengths = np.fromiter((len(ids) for ids in feats["input_ids"]), dtype=np.int64)
        return feats, lengths, np.argsort(-lengths, kind="stable")

    def gradient_checkpointing_enable(self):
        for model in self._backbones():
            enable_gradient_checkpointing(model)

    # ------------------------------------------------------------------ inference API
    def encode_queries(self, queries, batch_size=64, max_length=None, progress=False, chunk_size=16384):
        """One float32 row per query string, in input order: a numpy array (dense) or a scipy CSR matrix (sparse)."""
        return self._encode(_text_list(queries), "query", batch_size, max_length, progress, chunk_size)

    def encode_passages(self, passages, batch_size=64, max_length=None, progress=False, chunk_size=16384,
                        template=None):
        """One float32 row per passage, like `encode_queries`: strings, or (first, second) pairs tokenized as
        text pairs.

        With `template` (a name from reprolib.data.templates or a Template), items are (title, text)
        tuples or {"title", "text"} dicts rendered by it, with `{sep}` = this tokenizer's separator.
        """
        passages = _text_list(passages)
        if template is not None:
            passages = self.render(passages, template)
        return self._encode(passages, "passage", batch_size, max_length, progress, chunk_size)

    def render(self, items, template):
        from reprolib.data.templates import get_template

        tpl = get_template(template)
        out = []
        for item in items:
            title, text = (item.get("title", ""), item.get("text", "")) if isinstance(item, dict) else item
            out.append(tpl.render(title or "", text or "", sep=self.sep_token))
        return out

    @torch.inference_mode()
    def _run_batches(self, texts, side, batch_size, max_length, progress, chunk_size, keep):
        """Embed `texts` batch by batch and call keep(rows, vectors), `rows` being the batch's positions in
        `texts`. Within chunks of `chunk_size` texts, batches go longest first (an out-of-memory batch shows
        up at once) and are padded only to their own longest text."""
        max_length = self._clip(max_length or self.max_len(side))
        modes = {m: m.training for m in self.modules()}
        self.eval()
        device = self.device
        bar = None
        if progress:
            from reprolib.progress import tqdm

            bar = tqdm(total=len(texts), desc=f"encode {'queries' if side == 'query' else 'passages'}", unit="text")
        try:
            chunk_size = max(int(chunk_size), batch_size)
            for start in range(0, len(texts), chunk_size):
                feats, lengths, order = self._tokenize_by_length(texts[start:start + chunk_size], max_length)
                for b in range(0, len(order), batch_size):
                    idx = order[b:b + batch_size]
                    batch = self._pad(feats, idx, lengths)
                    keep(start + idx, self.embed({k: v.to(device) for k, v in batch.items()}, side))
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
            for m, mode in modes.items():
                m.training = mode

    def _pad(self, feats, idx, lengths):
        """Right-pad the rows `idx` of unpadded token lists to their own longest length."""
        width = int(lengths[idx].max())
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {}
        for key, rows in feats.items():
            arr = np.full((len(idx), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
            for r, i in enumerate(idx):
                row = rows[i]
                arr[r, :len(row)] = row
            batch[key] = torch.from_numpy(arr)
        return batch

    def _clip(self, max_length):
        limit = getattr(self.tokenizer, "model_max_length", None)
        if limit and limit < 1_000_000:
            return min(int(max_length), int(limit))
        return int(max_length)

    def save(self, path):
        """The HF folder of `self.model` (weights, config, tokenizer) + reprolib_encoder.json; encoders with
        more than one model (DenseEncoder's untied towers) override it."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        self._write_config(path)
        return path

    def _write_config(self, path):
        with atomic_write(Path(path) / CONFIG_NAME) as f:
            f.write(json.dumps(self.config_dict(), indent=2) + "\n")


class Buckets:
    """Tokenized chunks of a batch in length order, and `inverse`: the chunk rows' positions back in text order."""

    def __init__(self, chunks, inverse):
        self.chunks, self.inverse = chunks, inverse

    def to(self, device):
        return Buckets([{k: v.to(device) for k, v in chunk.items()} for chunk in self.chunks], self.inverse)


def saved_config(name_or_path):
    """The reprolib_encoder.json of a folder written by an encoder's `save`, or None (HF names, plain HF folders)."""
    from reprolib.modeling.specs import package_path

    path = Path(str(package_path(name_or_path))) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReprolibError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def template_lengths(template, query_max_len, passage_max_len):
    """The max lengths given, those unset (None) taken from `template` (a name or a Template) where one is given."""
    if template is not None:
        from reprolib.data.templates import get_template

        tpl = get_template(template)
        query_max_len, passage_max_len = query_max_len or tpl.query_max_len, passage_max_len or tpl.passage_max_len
    return dict(query_max_len=query_max_len, passage_max_len=passage_max_len)


def _text_list(texts):
    if isinstance(texts, (str, tuple)):
        raise TypeError("pass a list of texts, not a single text")
    return list(texts)


def _split_pairs(texts):
    """(first texts, second texts or None); items are all strings or all 2-tuples/lists."""
    texts = list(texts)
    if texts and isinstance(texts[0], (tuple, list)):
        if not all(isinstance(t, (tuple, list)) and len(t) == 2 for t in texts):
            raise ReprolibError("mix of pairs and plain texts: pass all strings or all (first, second) pairs")
        return [t[0] for t in texts], [t[1] for t in texts]
    if not all(isinstance(t, str) for t in texts):
        raise ReprolibError("texts must be strings or (first, second) pairs")
    return texts, None


def enable_gradient_checkpointing(model):
    """Recompute an HF model's activations in backward (non-reentrant, which works with DDP and frozen poolers)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):    # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
