"""Cross-encoder: one transformer reads the query and the passage together ([CLS] q [SEP] p [SEP]) and a
linear head on [CLS] gives one relevance logit (AutoModelForSequenceClassification with num_labels=1).

It is the teacher of the distillation recipes (docs/recipes.md §1.5: RetroMAE trains one with listwise cross
entropy over 1 positive + 64 negatives; sentence-transformers' ms-marco-MiniLM-L-6-v2 scores are the
Disentangled and OpenMatch teachers) and a reranker of a first-stage run.

It shares the tokenize / length-bucket / batched-inference code of the bi-encoders (`TextEncoder`): a
"passage" here is a (query, passage) pair, and `embed` returns one logit per pair instead of a vector.
`max_len` bounds the pair's tokens, the specials included.

`exact_match` adds DrQA's exact-match feature (Chen et al., 2017) through the token types: a word piece that also
occurs in the other text of the pair gets type 2 (query) or 3 (passage) instead of 0 or 1, so the model sees which
words match before it has learned to compare them through attention. A pretrained cross-encoder learned that
comparison in pretraining; a tiny one trained from random weights in minutes does not, and without the feature it
stays near chance on the synthetic set (bench/README.md, "Cross-encoders stay weak here"). The two new type rows
start as copies of the old ones, so a pretrained model starts unchanged. BERT-style models only (token types).
"""
from __future__ import annotations

import logging
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reprolib.errors import ReprolibError
from reprolib.modeling.encoder import TextEncoder, saved_config, set_dropout
from reprolib.modeling.sparse import quiet_load_report

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_LEN = 200        # RetroMAE's reranker (examples/reranker/README.md)


class CrossEncoder(TextEncoder):
    kind = "cross_encoder"

    def __init__(self, model, tokenizer, *, max_len=DEFAULT_MAX_LEN, exact_match=False):
        super().__init__(model, tokenizer, max_len, max_len)
        self.model = model
        self.exact_match = bool(exact_match)
        if self.exact_match:
            if "token_type_ids" not in tokenizer.model_input_names:
                raise ReprolibError(f"exact_match needs a tokenizer that marks the pair's two segments (token_type_ids); "
                                    f"{type(tokenizer).__name__} does not")
            _add_match_types(model)
            self._special_ids = torch.tensor(sorted(tokenizer.all_special_ids))
        head = getattr(model, "classifier", None) or getattr(model, "score", None)  # the HF names of the head
        if isinstance(head, nn.Module):
            _head_in_float32(head)

    @classmethod
    def from_pretrained(cls, name_or_path, max_len=None, dropout=None, exact_match=None, **model_kwargs):
        """An HF checkpoint (a sequence-classification one keeps its head; a plain encoder gets a new,
        randomly initialised one), a "package:" spec, or a folder written by `save`. `dropout` sets every
        dropout probability of the model (None: its config's); `exact_match` None: the saved model's (else off)."""
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
        if exact_match is None:
            exact_match = found.get("exact_match", False)
        encoder = cls(model, AutoTokenizer.from_pretrained(name_or_path),
                      max_len=max_len or found.get("max_len", DEFAULT_MAX_LEN), exact_match=exact_match)
        encoder.eval()
        return encoder

    def _backbones(self):
        return [self.model]

    def _model_inputs(self, batch):
        inputs = super()._model_inputs(batch)
        return _with_match_types(inputs, self._special_ids) if self.exact_match else inputs

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
        return dict(format_version=FORMAT_VERSION, kind=self.kind, max_len=self.passage_max_len,
                    exact_match=self.exact_match)

    def extra_repr(self):
        return f"max_len(pair)={self.passage_max_len}" + (", exact_match" if self.exact_match else "")


MATCH_TYPES = 4   # segment (0 query, 1 passage) + 2 x (the piece occurs in the other segment)


def _add_match_types(model):
    """Grow the token-type embedding from 2 rows to 4, the new rows copies of the old (a saved exact-match model
    has 4 already)."""
    embeddings = getattr(model.base_model, "embeddings", None)
    old = getattr(embeddings, "token_type_embeddings", None)
    if old is None or old.num_embeddings not in (2, MATCH_TYPES):
        found = old.num_embeddings if old is not None else 0
        raise ReprolibError(f"exact_match needs a BERT-style model with 2 token types; "
                            f"{type(model.base_model).__name__} has {found}")
    if old.num_embeddings == MATCH_TYPES:
        return
    new = nn.Embedding(MATCH_TYPES, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(2, 1))
    embeddings.token_type_embeddings = new
    model.config.type_vocab_size = MATCH_TYPES


def _with_match_types(inputs, special_ids):
    """`inputs` with token_type_ids = segment + 2 x (the piece, not a special or padding, occurs in the pair's other
    segment). Idempotent: a batch tokenized with it and passed to `embed` keeps its types."""
    ids, segment = inputs["input_ids"], inputs["token_type_ids"] % 2
    word = inputs["attention_mask"].bool() & ~torch.isin(ids, special_ids.to(ids.device))
    same = (ids[:, :, None] == ids[:, None, :]) & (segment[:, :, None] != segment[:, None, :]) & word[:, None, :]
    return {**inputs, "token_type_ids": segment + 2 * (same.any(-1) & word).long()}


def _head_in_float32(head):
    """Runs the head outside autocast: under bf16 a logit near 6 would be rounded to a step of 0.03, enough to
    tie candidates of a reranked list and to blur the teacher scores that are distilled. Bound as a method so
    that a deepcopy of the model gets a head that runs itself."""
    class_forward = type(head).forward

    def forward(self, hidden, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return class_forward(self, hidden.float(), *args, **kwargs)
    head.forward = types.MethodType(forward, head)
