"""Cross-encoder: one transformer reads the query and the passage together ([CLS] q [SEP] p [SEP]) and a
linear head on [CLS] gives one relevance logit (AutoModelForSequenceClassification with num_labels=1).

It is the teacher of the distillation recipes (docs/recipes.md §1.5: RetroMAE trains one with listwise cross
entropy over 1 positive + 64 negatives; sentence-transformers' ms-marco-MiniLM-L-6-v2 scores are the
Disentangled and OpenMatch teachers) and a reranker of a first-stage run.

It shares the tokenize / length-bucket / batched-inference code of the bi-encoders (`TextEncoder`): a
"passage" here is a (query, passage) pair, and `embed` returns one logit per pair instead of a vector.
`max_len` bounds the pair's tokens, the specials included.
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reprolib.modeling.encoder import TextEncoder, saved_config, set_dropout
from reprolib.modeling.sparse import quiet_load_report

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_LEN = 200        # RetroMAE's reranker (examples/reranker/README.md)


class CrossEncoder(TextEncoder):
    kind = "cross_encoder"

    def __init__(self, model, tokenizer, *, max_len=DEFAULT_MAX_LEN):
        super().__init__(model, tokenizer, max_len, max_len)
        self.model = model
        head = getattr(model, "classifier", None) or getattr(model, "score", None)  # the HF names of the head
        if isinstance(head, nn.Module):
            _head_in_float32(head)

    @classmethod
    def from_pretrained(cls, name_or_path, max_len=None, dropout=None, **model_kwargs):
        """An HF checkpoint (a sequence-classification one keeps its head; a plain encoder gets a new,
        randomly initialised one), a "package:" spec, or a folder written by `save`. `dropout` sets every
        dropout probability of the model (None: its config's)."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from reprolib.modeling.specs import package_path

        name_or_path = str(package_path(name_or_path))
        saved = saved_config(name_or_path) if Path(name_or_path).is_dir() else None
        found = saved if saved and saved.get("kind") == cls.kind else {}
        # num_labels goes in through the config: as a from_pretrained argument (or with output_loading_info)
        # transformers 5 logs a tensor-parallel warning for every layer
        config = set_dropout(AutoConfig.from_pretrained(name_or_path, num_labels=1), dropout)
        if not any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
            logger.warning("%s has no relevance head: added one (random init), to be trained", name_or_path)
        with quiet_load_report():   # the head's missing weights, said in one line above
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config, **model_kwargs)
        encoder = cls(model, AutoTokenizer.from_pretrained(name_or_path),
                      max_len=max_len or found.get("max_len", DEFAULT_MAX_LEN))
        encoder.eval()
        return encoder

    def _backbones(self):
        return [self.model]

    # ------------------------------------------------------------------ training-time API
    def embed(self, batch, side="passage"):
        """One logit per tokenized (query, passage) pair, keeping the autograd graph."""
        return self.model(**self._model_inputs(batch)).logits.squeeze(-1)

    # ------------------------------------------------------------------ inference API
    def score(self, pairs, batch_size=64, progress=False, chunk_size=16384):
        """float32 logits of (query text, passage text) pairs, in input order."""
        return self._encode(list(pairs), "passage", batch_size, None, progress, chunk_size)

    def _encode(self, texts, side, batch_size, max_length, progress, chunk_size):
        out = np.zeros(len(texts), dtype=np.float32)

        def keep(rows, logits):
            out[rows] = logits.float().cpu().numpy()

        self._run_batches(texts, side, batch_size, max_length, progress, chunk_size, keep)
        return out

    # ------------------------------------------------------------------ saving
    def config_dict(self):
        return dict(format_version=FORMAT_VERSION, kind=self.kind, max_len=self.passage_max_len)

    def extra_repr(self):
        return f"max_len(pair)={self.passage_max_len}"


def _head_in_float32(head):
    """Runs the head outside autocast: under bf16 a logit near 6 would be rounded to a step of 0.03, enough to
    tie candidates of a reranked list and to blur the teacher scores that are distilled. Bound as a method so
    that a deepcopy of the model gets a head that runs itself."""
    class_forward = type(head).forward

    def forward(self, hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return class_forward(self, hidden.float(), *args, **kwargs)
    head.forward = types.MethodType(forward, head)
