"""DenseEncoder: one bi-encoder for every recipe (docs/recipes.md 1.4, 2.2, 3 "Model", 6).

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
pad each batch only to its own longest text, and return float32 numpy rows in the input order
(tokenization and batching are shared with the sparse encoder: reprolib.modeling.encoder).

`save(path)` writes HF files (config, weights, tokenizer; `query/` and `passage/` when untied), a
`reprolib_encoder.json`, and, for tied models, the sentence-transformers files so that
`SentenceTransformer(path)` gives the same passage embeddings.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reprolib.errors import ReprolibError
from reprolib.modeling.encoder import SIDES, TextEncoder, saved_config, set_dropout, template_lengths

logger = logging.getLogger(__name__)

PROJECTION_NAME = "projection.safetensors"
FORMAT_VERSION = 1
POOLINGS = {"cls": "cls", "first": "cls", "mean": "mean"}
T5_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
DEFAULTS = dict(pooling="cls", normalize=False, projection_dim=None, projection_bias=True,
                t5_mode="decoder", query_max_len=32, passage_max_len=128)


class DenseEncoder(TextEncoder):
    kind = "dense"

    def __init__(self, backbone, tokenizer, *, pooling="cls", normalize=False, projection_dim=None,
                 projection_bias=True, untie=False, t5_mode="decoder", query_max_len=32, passage_max_len=128,
                 passage_backbone=None):
        super().__init__(backbone, tokenizer, query_max_len, passage_max_len)
        if pooling not in POOLINGS:
            raise ReprolibError(f"unknown pooling {pooling!r}; choose from cls, first, mean")
        if t5_mode not in ("decoder", "encoder"):
            raise ReprolibError(f"unknown t5_mode {t5_mode!r}; choose from decoder, encoder")
        self.encoder = backbone                      # the query tower, and the only one when tied
        self.passage_encoder = passage_backbone      # None when tied
        if untie and passage_backbone is None:
            self.passage_encoder = copy.deepcopy(backbone)
        self.pooling = POOLINGS[pooling]
        self.normalize = bool(normalize)
        self.t5_mode = t5_mode
        self.projection_bias = bool(projection_bias)
        self.projection_dim = projection_dim
        self.projection = self.passage_projection = None
        if projection_dim:
            self.projection = nn.Linear(self.hidden_size, int(projection_dim), bias=self.projection_bias)
            if self.untied:
                self.passage_projection = copy.deepcopy(self.projection)
        for model in self._backbones():
            _freeze_unused_pooler(model)

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

    def _backbones(self):
        return [self.encoder] + ([self.passage_encoder] if self.untied else [])

    def _tower(self, side):
        if side not in SIDES:
            raise ValueError(f"side must be 'query' or 'passage', not {side!r}")
        if side == "passage" and self.untied:
            return self.passage_encoder, self.passage_projection
        return self.encoder, self.projection

    # ------------------------------------------------------------------ training-time API
    def embed(self, batch, side="query"):
        """Vectors (B, dim) for a tokenized batch (dict of tensors), keeping the autograd graph."""
        model, projection = self._tower(side)
        inputs = self._model_inputs(batch)
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

    # ------------------------------------------------------------------ inference API
    def _encode(self, texts, side, batch_size, max_length, progress, chunk_size):
        """float32 array (N, dim), rows in the order of `texts` (encode_queries / encode_passages)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)

        def keep(rows, reps):
            out[rows] = reps.float().cpu().numpy()

        self._run_batches(texts, side, batch_size, max_length, progress, chunk_size, keep)
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path, pooling=None, normalize=None, projection_dim=None, untie=None,
                        t5_mode=None, query_max_len=None, passage_max_len=None, projection_bias=None,
                        template=None, dropout=None, **model_kwargs):
        """Load an HF model (name or path), a sentence-transformers model (folder or Hub name), or a folder written by
        `save`.

        Unset arguments come from, in order: `template` (max lengths), the folder's reprolib_encoder.json
        or sentence-transformers config (a Hub name's too; a saved untied model loads untied), then the defaults
        pooling="cls", normalize=False,
        t5_mode="decoder", query/passage max length 32/128. `dropout` sets every dropout probability of the
        backbone (None: its config's). `model_kwargs` go to `from_pretrained` of the backbone (e.g.
        dtype=torch.bfloat16, attn_implementation="sdpa").
        """
        from transformers import AutoTokenizer

        from reprolib.modeling.specs import package_path

        name_or_path = package_path(name_or_path)   # "package:<pkg>/<subdir>": a model shipped in a package
        path = Path(str(name_or_path))
        saved = saved_config(path) if path.is_dir() else None
        if saved and saved.get("kind", "dense") != "dense":
            raise ReprolibError(f"{path} holds a {saved['kind']} encoder; load it with "
                                "reprolib.modeling.load_encoder")
        st = None if saved else _read_sentence_transformers(path if path.is_dir() else _hub_files(str(name_or_path)))
        if st and st["transformer_path"] and not path.is_dir():
            raise ReprolibError(f"{name_or_path}: its sentence-transformers model lies in {st['transformer_path']!r}; "
                                "download it into a folder and load that")
        found = saved or (st or {})
        explicit = dict(pooling=pooling, normalize=normalize, projection_dim=projection_dim,
                        projection_bias=projection_bias, t5_mode=t5_mode,
                        **template_lengths(template, query_max_len, passage_max_len))
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
            backbone = _load_backbone(q_dir, opts["t5_mode"], dropout, **model_kwargs)
            p_backbone = _load_backbone(p_dir, opts["t5_mode"], dropout, **model_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(q_dir))
        else:
            model_dir = str(path / st["transformer_path"]) if st else str(name_or_path)
            backbone = _load_backbone(model_dir, opts["t5_mode"], dropout, **model_kwargs)
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
        return dict(format_version=FORMAT_VERSION, kind=self.kind, pooling=self.pooling, normalize=self.normalize,
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
        self._write_config(path)
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
def pool(hidden, mask, pooling):
    """First-token or masked-mean pooling of (B, L, H) hidden states."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _load_backbone(path, t5_mode, dropout=None, **kwargs):
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(path))
    if dropout is not None:
        kwargs["config"] = set_dropout(config, dropout)
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


# a sentence-transformers model's settings: its modules, the Transformer's max length, the Pooling's mode
ST_FILES = ["modules.json", "sentence_bert_config.json", "*/config.json", "*/sentence_bert_config.json"]


def _hub_files(name):
    """The local copy of Hub model `name`'s sentence-transformers files (fetched, or from the cache offline), so that
    a model loaded by name pools as its folder would; None where `name` is no Hub model or has none of them."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=ST_FILES))
    except Exception:   # not a repo id, no such model, no network and no cache: loading the weights says which
        return None


def _read_sentence_transformers(path):
    """Settings of a local sentence-transformers folder (pooling, normalize, max length) or None."""
    modules = _read_json(path / "modules.json") if path is not None and path.is_dir() else None
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
