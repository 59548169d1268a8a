"""DenseEncoder: one bi-encoder for every recipe (RECIPES.md 1.4, 2.2, 3 "Model", 6).

    text --tokenizer--> backbone --pool--> [projection] --> [L2 normalize] --> vector

* backbone: any HF encoder through AutoModel (BERT, RoBERTa, MiniLM, ...) or T5 in one of two modes:
  - "decoder" (OpenMatch's default): the full T5 runs with decoder_input_ids = a single token id 0, and
    the vector is the decoder's last hidden state at position 0 (pooling is ignored);
  - "encoder" (OpenMatch `--encoder_only`): T5EncoderModel + pooling ("first" or "mean").
* pooling: "cls" (= "first", the first token) or "mean" (masked mean, counts clamped at 1e-9).
* projection: an optional Linear(hidden, projection_dim) after pooling, tied across q/p unless untied
  (RetroMAE/Tevatron `add_pooler` has a bias; OpenMatch's linear head has none: `projection_bias`).
* towers: tied (one backbone) by default; `untie=True` deep-copies it into a separate passage tower.
* similarity is the inner product of the returned vectors (cosine when `normalize=True`).

Training calls `embed(batch, side)` (or `forward(query=..., passage=...)`, which goes through DDP);
indexing calls `encode_queries` / `encode_passages`, which sort texts by token length inside chunks,
pad each batch only to its own longest text, and return float32 numpy rows in the input order.

`save(path)` writes HF files (config, weights, tokenizer; `query/` and `passage/` when untied), a
`reprolib_encoder.json`, and, for tied models, the sentence-transformers files so that
`SentenceTransformer(path)` gives the same passage embeddings.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reprolib.errors import ReprolibError

logger = logging.getLogger(__name__)

CONFIG_NAME = "reprolib_encoder.json"
PROJECTION_NAME = "projection.safetensors"
FORMAT_VERSION = 1
POOLINGS = {"cls": "cls", "first": "cls", "mean": "mean"}
SIDES = ("query", "passage")
T5_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
DEFAULTS = dict(pooling="cls", normalize=False, projection_dim=None, projection_bias=True,
                t5_mode="decoder", query_max_len=32, passage_max_len=128)


class DenseEncoder(nn.Module):
    def __init__(self, backbone, tokenizer, *, pooling="cls", normalize=False, projection_dim=None,
                 projection_bias=True, untie=False, t5_mode="decoder", query_max_len=32, passage_max_len=128,
                 passage_backbone=None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ReprolibError(f"unknown pooling {pooling!r}; choose from cls, first, mean")
        if t5_mode not in ("decoder", "encoder"):
            raise ReprolibError(f"unknown t5_mode {t5_mode!r}; choose from decoder, encoder")
        self.encoder = backbone                      # the query tower, and the only one when tied
        self.passage_encoder = passage_backbone      # None when tied
        if untie and passage_backbone is None:
            self.passage_encoder = copy.deepcopy(backbone)
        self.tokenizer = tokenizer
        self.pooling = POOLINGS[pooling]
        self.normalize = bool(normalize)
        self.t5_mode = t5_mode
        self.query_max_len = int(query_max_len)
        self.passage_max_len = int(passage_max_len)
        self.projection_bias = bool(projection_bias)
        self.projection_dim = projection_dim
        self.projection = self.passage_projection = None
        if projection_dim:
            self.projection = nn.Linear(self.hidden_size, int(projection_dim), bias=self.projection_bias)
            if self.untied:
                self.passage_projection = copy.deepcopy(self.projection)
        for model in self._backbones():
            _freeze_unused_pooler(model)
        accepted = inspect.signature(self.encoder.forward).parameters
        self._input_keys = {"input_ids", "attention_mask"} | ({"token_type_ids"} & set(accepted))

    # ------------------------------------------------------------------ properties
    @property
    def untied(self):
        return self.passage_encoder is not None

    @property
    def is_seq2seq(self):
        """True for an encoder-decoder backbone run in OpenMatch's decoder mode."""
        return bool(getattr(self.encoder.config, "is_encoder_decoder", False)) and self.t5_mode == "decoder"

    @property
    def hidden_size(self):
        config = self.encoder.config
        return getattr(config, "d_model", None) or config.hidden_size

    @property
    def dim(self):
        """The size of the returned vectors."""
        return int(self.projection_dim) if self.projection_dim else self.hidden_size

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def sep_token(self):
        """What a template's `{sep}` becomes for this tokenizer ("[SEP]" for BERT, "</s>" for RoBERTa/T5)."""
        return self.tokenizer.sep_token or self.tokenizer.eos_token or " "

    def _backbones(self):
        return [self.encoder] + ([self.passage_encoder] if self.untied else [])

    def _tower(self, side):
        if side not in SIDES:
            raise ValueError(f"side must be 'query' or 'passage', not {side!r}")
        if side == "passage" and self.untied:
            return self.passage_encoder, self.passage_projection
        return self.encoder, self.projection

    def max_len(self, side):
        return self.query_max_len if side == "query" else self.passage_max_len

    # ------------------------------------------------------------------ training-time API
    def embed(self, batch, side="query"):
        """Vectors (B, dim) for a tokenized batch (dict of tensors), keeping the autograd graph."""
        model, projection = self._tower(side)
        inputs = {k: v for k, v in batch.items() if k in self._input_keys}
        mask = inputs["attention_mask"]
        if self.is_seq2seq:
            start = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=mask.device)
            out = model(input_ids=inputs["input_ids"], attention_mask=mask, decoder_input_ids=start)
            reps = out.last_hidden_state[:, 0]
        else:
            hidden = model(**inputs).last_hidden_state
            reps = pool(hidden, mask, self.pooling)
        if projection is not None:
            reps = projection(reps)
        if self.normalize:
            reps = F.normalize(reps, p=2, dim=-1)
        return reps

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

    def tokenize(self, texts, side="query", max_length=None, pad_to_multiple_of=None):
        """Tokenize a training batch: dynamic padding (to the longest text, optionally to a multiple of N)."""
        first, second = _split_pairs(texts)
        enc = self.tokenizer(first, second, truncation=True, max_length=self._clip(max_length or self.max_len(side)),
                             padding=True, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in self._input_keys}

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
        """Recompute activations in backward (non-reentrant, which works with DDP and frozen poolers)."""
        options = {"use_reentrant": False}
        for model in self._backbones():
            if hasattr(model, "activation_checkpointing_enable"):    # transformers >= 5.x's name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    # ------------------------------------------------------------------ inference API
    def encode_queries(self, queries, batch_size=64, max_length=None, progress=False, chunk_size=16384):
        """float32 array (N, dim) for a list of query strings, rows in input order."""
        return self._encode(queries, "query", batch_size, max_length, progress, chunk_size)

    def encode_passages(self, passages, batch_size=64, max_length=None, progress=False, chunk_size=16384,
                        template=None):
        """float32 array (N, dim) for passages: strings, or (first, second) pairs tokenized as text pairs.

        With `template` (a name from reprolib.data.templates or a Template), items are (title, text)
        tuples or {"title", "text"} dicts rendered by it, with `{sep}` = this tokenizer's separator.
        """
        if template is not None:
            passages = self.render(passages, template)
        return self._encode(passages, "passage", batch_size, max_length, progress, chunk_size)

    def render(self, items, template):
        from reprolib.data.templates import get_template

        tpl = get_template(template) if isinstance(template, str) else template
        out = []
        for item in items:
            title, text = (item.get("title", ""), item.get("text", "")) if isinstance(item, dict) else item
            out.append(tpl.render(title or "", text or "", sep=self.sep_token))
        return out

    @torch.inference_mode()
    def _encode(self, texts, side, batch_size, max_length, progress, chunk_size):
        if isinstance(texts, (str, tuple)):
            raise TypeError("pass a list of texts, not a single text")
        texts = list(texts)
        max_length = self._clip(max_length or self.max_len(side))
        modes = {m: m.training for m in self.modules()}
        self.eval()
        device = self.device
        out = None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"encode {side}s", unit="text")
        try:
            chunk_size = max(int(chunk_size), batch_size)
            for start in range(0, len(texts), chunk_size):
                # longest first: an out-of-memory batch shows up at once
                feats, lengths, order = self._tokenize_by_length(texts[start:start + chunk_size], max_length)
                for b in range(0, len(order), batch_size):
                    idx = order[b:b + batch_size]
                    batch = self._pad(feats, idx, lengths)
                    reps = self.embed({k: v.to(device) for k, v in batch.items()}, side).float().cpu().numpy()
                    if out is None:
                        out = np.empty((len(texts), reps.shape[1]), dtype=np.float32)
                    out[start + idx] = reps
                    if bar is not None:
                        bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
            for m, mode in modes.items():
                m.training = mode
        if out is None:
            out = np.empty((0, self.dim), dtype=np.float32)
        return out

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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path, pooling=None, normalize=None, projection_dim=None, untie=None,
                        t5_mode=None, query_max_len=None, passage_max_len=None, projection_bias=None,
                        template=None, **model_kwargs):
        """Load an HF model (name or path), a sentence-transformers folder, or a folder written by `save`.

        Unset arguments come from, in order: `template` (max lengths), the folder's reprolib_encoder.json
        or sentence-transformers config (a saved untied model loads untied), then the defaults pooling="cls", normalize=False,
        t5_mode="decoder", query/passage max length 32/128. `model_kwargs` go to `from_pretrained` of
        the backbone (e.g. dtype=torch.bfloat16, attn_implementation="sdpa").
        """
        from transformers import AutoTokenizer

        from reprolib.modeling.specs import package_path

        name_or_path = package_path(name_or_path)   # "package:<pkg>/<subdir>": a model shipped in a package
        path = Path(str(name_or_path))
        saved = _read_json(path / CONFIG_NAME) if path.is_dir() else None
        st = None if saved else _read_sentence_transformers(path)
        found = saved or (st or {})
        explicit = dict(pooling=pooling, normalize=normalize, projection_dim=projection_dim,
                        projection_bias=projection_bias, t5_mode=t5_mode,
                        query_max_len=query_max_len, passage_max_len=passage_max_len)
        if template is not None:
            from reprolib.data.templates import get_template

            tpl = get_template(template) if isinstance(template, str) else template
            explicit["query_max_len"] = explicit["query_max_len"] or tpl.query_max_len
            explicit["passage_max_len"] = explicit["passage_max_len"] or tpl.passage_max_len
        opts = {}
        for key, default in DEFAULTS.items():
            value = explicit[key]
            opts[key] = value if value is not None else found.get(key, default)
        if explicit["t5_mode"] is None and "t5_mode" not in found:
            opts["t5_mode"] = _default_t5_mode(st["transformer_path"] if st else name_or_path, path, st)
        if saved:
            for key in ("projection_dim", "t5_mode", "projection_bias"):
                if explicit[key] is not None and explicit[key] != saved.get(key):
                    raise ReprolibError(f"{path}: saved with {key}={saved.get(key)!r}, asked for {explicit[key]!r}")
            if saved.get("untie") and untie is False:
                raise ReprolibError(f"{path}: saved with untied towers; they cannot be loaded tied (untie=False)")
        untie = bool(untie) if untie is not None else bool(saved and saved.get("untie"))

        if saved and saved.get("untie"):
            q_dir, p_dir = path / "query", path / "passage"
            backbone = _load_backbone(q_dir, opts["t5_mode"], **model_kwargs)
            p_backbone = _load_backbone(p_dir, opts["t5_mode"], **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(q_dir))
        else:
            model_dir = str(path / st["transformer_path"]) if st else str(name_or_path)
            backbone = _load_backbone(model_dir, opts["t5_mode"], **model_kwargs)
            p_backbone = None
            q_dir = p_dir = path
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        encoder = cls(backbone, tokenizer, untie=untie, passage_backbone=p_backbone, **opts)
        encoder.eval()  # like transformers' from_pretrained; training loops call .train()
        if saved and opts["projection_dim"]:
            from safetensors.torch import load_file

            encoder.projection.load_state_dict(load_file(str(q_dir / PROJECTION_NAME)))
            if encoder.untied:
                # a tied checkpoint loaded with untie=True starts both towers from the same projection
                src = p_dir if saved.get("untie") else q_dir
                encoder.passage_projection.load_state_dict(load_file(str(src / PROJECTION_NAME)))
        return encoder

    # ------------------------------------------------------------------ saving
    def config_dict(self):
        return dict(format_version=FORMAT_VERSION, pooling=self.pooling, normalize=self.normalize,
                    projection_dim=int(self.projection_dim) if self.projection_dim else None,
                    projection_bias=self.projection_bias, untie=self.untied, t5_mode=self.t5_mode,
                    query_max_len=self.query_max_len, passage_max_len=self.passage_max_len,
                    seq2seq=self.is_seq2seq, hidden_size=self.hidden_size, dim=self.dim)

    def save(self, path):
        """HF files (per tower when untied) + reprolib_encoder.json (+ sentence-transformers files when tied)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.untied:
            self._save_tower(path / "query", self.encoder, self.projection)
            self._save_tower(path / "passage", self.passage_encoder, self.passage_projection)
        else:
            self._save_tower(path, self.encoder, self.projection)
            if self.is_seq2seq:
                logger.info("T5 decoder-mode encoders have no sentence-transformers equivalent; "
                            "wrote HF + reprolib files only")
            else:
                self._save_sentence_transformers(path)
        (path / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        return path

    def _save_tower(self, path, model, projection):
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        if projection is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in projection.state_dict().items()},
                      str(path / PROJECTION_NAME))

    def _save_sentence_transformers(self, path):
        """modules.json + Transformer/Pooling/[Dense]/[Normalize] configs, in the classic ST layout."""
        from safetensors.torch import save_file

        modules = [("", "sentence_transformers.models.Transformer"),
                   ("1_Pooling", "sentence_transformers.models.Pooling")]
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.passage_max_len, "do_lower_case": False})
        _write_json(path / "1_Pooling" / "config.json", {
            "word_embedding_dimension": self.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        })
        if self.projection is not None:
            folder = f"{len(modules)}_Dense"
            modules.append((folder, "sentence_transformers.models.Dense"))
            _write_json(path / folder / "config.json", {
                "in_features": self.hidden_size, "out_features": self.dim, "bias": self.projection_bias,
                "activation_function": "torch.nn.modules.linear.Identity"})
            save_file({f"linear.{k}": v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()},
                      str(path / folder / "model.safetensors"))
        if self.normalize:
            folder = f"{len(modules)}_Normalize"
            modules.append((folder, "sentence_transformers.models.Normalize"))
            (path / folder).mkdir(exist_ok=True)
        _write_json(path / "modules.json", [{"idx": i, "name": str(i), "path": p, "type": t}
                                             for i, (p, t) in enumerate(modules)])
        _write_json(path / "config_sentence_transformers.json", {
            "__version__": _versions(), "model_type": "SentenceTransformer", "prompts": {},
            "default_prompt_name": None, "similarity_fn_name": "cosine" if self.normalize else "dot"})

    def extra_repr(self):
        return (f"pooling={self.pooling}, normalize={self.normalize}, projection_dim={self.projection_dim}, "
                f"untied={self.untied}, seq2seq={self.is_seq2seq}, max_len(q/p)={self.query_max_len}/{self.passage_max_len}")


# ---------------------------------------------------------------------- helpers
class Buckets:
    """Tokenized chunks of a batch in length order, and `inverse`: the chunk rows' positions back in text order."""

    def __init__(self, chunks, inverse):
        self.chunks, self.inverse = chunks, inverse

    def to(self, device):
        return Buckets([{k: v.to(device) for k, v in chunk.items()} for chunk in self.chunks], self.inverse)


def pool(hidden, mask, pooling):
    """First-token or masked-mean pooling of (B, L, H) hidden states."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


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


def _load_backbone(path, t5_mode, **kwargs):
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    # (a checkpoint saved from T5EncoderModel has is_encoder_decoder=False in its config)
    if getattr(config, "is_encoder_decoder", False) or config.model_type in T5_ENCODER_CLASSES:
        if t5_mode == "decoder":
            return AutoModel.from_pretrained(str(path), **kwargs)   # T5Model: encoder + decoder, no LM head
        name = T5_ENCODER_CLASSES.get(config.model_type)
        if name is None:
            raise ReprolibError(f"{path}: encoder-only mode supports {', '.join(T5_ENCODER_CLASSES)}, "
                                f"not {config.model_type}")
        return getattr(transformers, name).from_pretrained(str(path), **kwargs)
    return AutoModel.from_pretrained(str(path), **kwargs)


def _default_t5_mode(sub, path, st):
    """"encoder" for a T5 checkpoint saved as an encoder-only model (GTR, sentence-T5), else "decoder"."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path / sub) if st else str(sub))
    except (OSError, ValueError):
        return "decoder"
    if any(a.endswith("EncoderModel") for a in (getattr(config, "architectures", None) or [])):
        return "encoder"
    return "decoder"


def _freeze_unused_pooler(model):
    """BERT/RoBERTa's pooler (dense+tanh on CLS) is never used: keep its weights (so the checkpoint stays a
    complete HF model) but take it out of training, so that DDP does not wait for its gradients."""
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read_sentence_transformers(path):
    """Settings of a local sentence-transformers folder (pooling, normalize, max length) or None."""
    modules = _read_json(path / "modules.json") if path.is_dir() else None
    if not modules:
        return None
    out = {"transformer_path": ""}
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1].lower()
        folder = path / module.get("path", "")
        if kind == "transformer":
            out["transformer_path"] = module.get("path", "")
            cfg = _read_json(folder / "sentence_bert_config.json") or {}
            if cfg.get("max_seq_length"):
                out["query_max_len"] = out["passage_max_len"] = int(cfg["max_seq_length"])
        elif kind == "pooling":
            cfg = _read_json(folder / "config.json") or {}
            mode = cfg.get("pooling_mode") or ("cls" if cfg.get("pooling_mode_cls_token") else
                                                "mean" if cfg.get("pooling_mode_mean_tokens") else None)
            if mode not in POOLINGS:
                raise ReprolibError(f"{path}: sentence-transformers pooling {mode!r} is not supported (cls, mean)")
            out["pooling"] = POOLINGS[mode]
        elif kind == "normalize":
            out["normalize"] = True
        else:
            raise ReprolibError(f"{path}: sentence-transformers module {module.get('type')!r} is not supported "
                                "(Transformer, Pooling, Normalize)")
    return out


def _versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("sentence-transformers", "transformers", "torch"):
        try:
            out[name.replace("-", "_") if name != "torch" else "pytorch"] = version(name)
        except PackageNotFoundError:
            pass
    return out
