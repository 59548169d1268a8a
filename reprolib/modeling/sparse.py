"""SparseEncoder: the LexMAE / SPLADE lexicon-weighting retriever (docs/recipes.md §4.3).

    text --tokenizer--> BERT + MLM head --> logits W [L, V]
    w_v = max over text positions i of log(1 + ReLU(W_iv))          one weight per vocabulary entry

Text positions exclude padding, [CLS] and [SEP], as LexMAE's text mask does; [UNK] is text. Because log1p and ReLU are monotonic, the max is taken over the raw
logits first and saturated after: one [B, V] operation instead of three over [B, L, V]. Similarity is
the dot product of the weight vectors; queries and passages share the model.

A checkpoint without an MLM head (a plain BertModel, e.g. all-MiniLM-L6-v2) gets BERT's head with an
identity transform and its output projection tied to the word embeddings, so that the vocabulary scores
start as each hidden state's similarity to each word embedding (a text's own words first); the sparse
objective then shifts its bias so that a passage starts with a few hundred terms (`calibrate_bias`). A
checkpoint with a head keeps it; the sparse objective shifts its bias too if it switches on more terms than that
(an MLM head: its bias level is free, as the softmax ignores it).

Training uses `forward(query=..., passage=...)` like the DenseEncoder (vectors [B, V] with autograd);
`encode_queries` / `encode_passages` return scipy CSR matrices [N, V] (float32), built batch by batch so
that no dense N x V array exists. `save(path)` writes the HF masked-LM folder and a
`reprolib_encoder.json` with kind "sparse" and the max lengths.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from reprolib.modeling.encoder import TextEncoder, saved_config, set_dropout, template_lengths

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULTS = dict(query_max_len=32, passage_max_len=144)   # LexMAE fine-tuning (§4.3)
INITIAL_NONZEROS = 256   # a new head's start: a few hundred terms per passage, LexMAE's index has ~100-300


class SparseEncoder(TextEncoder):
    kind = "sparse"

    def __init__(self, model, tokenizer, *, query_max_len=32, passage_max_len=144):
        """`model`: an HF masked-LM (BertForMaskedLM, ...) whose logits score the vocabulary."""
        super().__init__(model, tokenizer, query_max_len, passage_max_len)
        self.model = model
        special = [i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id) if i is not None]
        self.register_buffer("special_ids", torch.tensor(special, dtype=torch.long), persistent=False)

    @property
    def dim(self):
        """The width of the returned vectors: the vocabulary size, one weight per token."""
        return int(self.model.config.vocab_size)

    def _backbones(self):
        return [self.model]

    # ------------------------------------------------------------------ training-time API
    def embed(self, batch, side="query"):
        """Lexicon weights (B, V) for a tokenized batch, keeping the autograd graph (`side` is accepted for
        the shared API: both sides use the same model)."""
        return torch.log1p(torch.relu(self._max_logits(batch)))

    def _max_logits(self, batch):
        """(B, V) each vocabulary logit's max over the text positions."""
        inputs = self._model_inputs(batch)
        ids = inputs["input_ids"]
        text = inputs["attention_mask"].bool() & ~torch.isin(ids, self.special_ids.to(ids.device))
        transform = _head_transform(self.model)
        if transform is not None:    # a BERT head: project and pool without the [B, L, V] logits in memory
            hidden = transform(self.model.base_model(**inputs).last_hidden_state)
            projection = self.model.get_output_embeddings()
            return max_pooled_projection(hidden, projection.weight, projection.bias, text)
        logits = self.model(**inputs).logits
        # off-text positions are never the max; a text without text tokens pools to -inf, which ReLU makes 0
        return logits.masked_fill(~text.unsqueeze(-1), float("-inf")).amax(dim=1)

    def calibrate_bias(self, texts, nonzeros=INITIAL_NONZEROS, batch_size=32, denser_only=False):
        """Shift every vocabulary bias by one constant so that `texts` (passages) switch on about `nonzeros`
        terms each; returns the mean non-zeros before and after. With `denser_only`, texts that already switch on
        `nonzeros` or fewer are left as they are (after = before). For a head added to a checkpoint without one:
        its logits start centred on zero, so every term is positive somewhere in a passage (all-MiniLM-L6-v2 on
        SciFact: 30,522 of 30,522), an index as dense as the vocabulary that a short fine-tuning never thins out
        (test nDCG@10 0.033). A constant shift keeps each text's ranking of the terms, and an MLM head's
        predictions: its softmax ignores a shift shared by every term."""
        maxima = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenize(texts[start:start + batch_size], "passage")
                maxima.append(self._max_logits({k: v.to(self.device) for k, v in batch.items()}).float().flatten())
            values = torch.cat(maxima)
            before = float((values > 0).sum()) / len(texts)
            threshold = values.topk(min(len(values), nonzeros * len(texts))).values[-1]
            if denser_only and before <= nonzeros:
                threshold = values.new_zeros(())
            self.model.get_output_embeddings().bias -= threshold
        self.train(was_training)
        return before, float((values > threshold).sum()) / len(texts)

    # ------------------------------------------------------------------ inference API
    def _encode(self, texts, side, batch_size, max_length, progress, chunk_size):
        """scipy CSR float32 [N, V], rows in the order of `texts` (encode_queries / encode_passages)."""
        import scipy.sparse

        parts, rows = [], []

        def keep(batch_rows, reps):
            parts.append(scipy.sparse.csr_matrix(reps.float().cpu().numpy()))
            rows.append(batch_rows)

        self._run_batches(texts, side, batch_size, max_length, progress, chunk_size, keep)
        if not parts:
            return scipy.sparse.csr_matrix((0, self.dim), dtype=np.float32)
        # batches ran in length order: put the rows back in input order
        return scipy.sparse.vstack(parts, format="csr")[np.argsort(np.concatenate(rows))]

    def nonzeros(self, texts, side="passage", batch_size=64):
        """How many vocabulary terms each text switches on (its non-zero weights): an int array."""
        encode = self.encode_queries if side == "query" else self.encode_passages
        return np.diff(encode(texts, batch_size=batch_size).indptr)

    def top_terms(self, text, side="passage", k=15):
        """The `k` heaviest (term, weight) pairs of one text's vector, heaviest first: what it is matched on."""
        row = (self.encode_queries if side == "query" else self.encode_passages)([text]).tocoo()
        order = np.argsort(-row.data, kind="stable")[:k]
        return list(zip(self.tokenizer.convert_ids_to_tokens(row.col[order].tolist()), row.data[order].tolist()))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path, query_max_len=None, passage_max_len=None, template=None, dropout=None,
                        **model_kwargs):
        """Load an HF masked-LM (name or path; "package:" specs too), a plain HF encoder (a head is added), or a
        folder written by `save`.

        Max lengths come from, in order: the arguments, `template`, the folder's reprolib_encoder.json, then
        LexMAE's 32 / 144. `dropout` sets every dropout probability of the model (None: its config's).
        `model_kwargs` go to AutoModelForMaskedLM.from_pretrained.
        """
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        from reprolib.modeling.specs import package_path

        name_or_path = str(package_path(name_or_path))
        if dropout is not None:
            model_kwargs["config"] = set_dropout(AutoConfig.from_pretrained(name_or_path), dropout)
        saved = saved_config(name_or_path) if Path(name_or_path).is_dir() else None
        found = saved if saved and saved.get("kind") == cls.kind else {}
        explicit = template_lengths(template, query_max_len, passage_max_len)
        opts = {key: explicit[key] if explicit[key] is not None else found.get(key, default)
                for key, default in DEFAULTS.items()}

        with quiet_load_report():  # replaced by the one-line warnings below
            model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True, **model_kwargs)
        prefix = model.base_model_prefix + "."
        missing = sorted(info["missing_keys"])
        new_head = any(not key.startswith(prefix) for key in missing)
        if new_head:
            _tie_output_projection(model)
            start = "identity" if _identity_transform(model) else "random"
            logger.warning("%s has no MLM head: added one (%s transform, output projection tied to the word "
                           "embeddings)", name_or_path, start)
        backbone_missing = [key for key in missing if key.startswith(prefix)]
        if backbone_missing:
            logger.warning("%s: %d backbone weights are not in the checkpoint and start random (%s, ...)",
                           name_or_path, len(backbone_missing), backbone_missing[0])
        encoder = cls(model, AutoTokenizer.from_pretrained(name_or_path), **opts)
        encoder.new_head = new_head   # the head was added here, not read from the checkpoint
        encoder.eval()  # like transformers' from_pretrained; training loops call .train()
        return encoder

    # ------------------------------------------------------------------ saving
    def config_dict(self):
        return dict(format_version=FORMAT_VERSION, kind=self.kind, query_max_len=self.query_max_len,
                    passage_max_len=self.passage_max_len, vocab_size=self.dim)

    def extra_repr(self):
        return f"vocab={self.dim}, max_len(q/p)={self.query_max_len}/{self.passage_max_len}"


def _head_transform(model):
    """The part of a BERT-style MLM head before its vocabulary projection (dense -> GELU -> LayerNorm), or None
    for a head of another shape (its logits are then computed whole)."""
    return getattr(getattr(getattr(model, "cls", None), "predictions", None), "transform", None)


VOCAB_CHUNK = 4096   # vocabulary columns projected at a time: [B, L, 4096] floats instead of [B, L, V]
# Backward gathers rows for each (text, term) with a gradient, or places the gradient and multiplies matrices:
# per element of a row, a gather costs about 130-340 times a matmul's multiply-add (tiny BERT to MiniLM, one AVX-512
# thread; bench/README.md), so the matmuls win once more than about L/200 of the (text, term) pairs have a gradient.
GATHER_COST = 200


def max_pooled_projection(hidden, weight, bias, text):
    """(B, V) max over the text positions of hidden @ weight.T + bias; hidden [B, L, H], weight [V, H], bias [V],
    text [B, L] bool. Equal to projecting and then pooling, but without the [B, L, V] logits."""
    return _MaxPooledProjection.apply(hidden, weight, bias, text)


class _MaxPooledProjection(torch.autograd.Function):
    """The vocabulary projection fused with the max over positions.

    Forward projects VOCAB_CHUNK columns at a time and keeps each column's max and the position it came from.
    A max passes its gradient to that one position, so backward needs no [B, L, V] product either: each
    (text, term) with a non-zero gradient adds grad * weight[term] to the hidden state at its position, and
    grad * hidden[position] to the term's weight row. Sparse training's gradients are zero wherever
    log(1 + ReLU) is, so backward touches a few hundred terms per text instead of L x V logits
    (all-MiniLM-L6-v2, 64 passages x 128 tokens: bench/sparse_step.py). LexMAE's softmax bottleneck sends a
    gradient to every term; row-by-row gathers are then slower than two matmuls with the gradient placed at
    its positions, a vocabulary slice at a time (bench/README.md, "One sparse training step")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, text):
        batch, length, _ = hidden.shape
        vocab = weight.shape[0]
        w = weight.to(hidden.dtype)
        off_text = ~text.unsqueeze(-1)
        pooled = hidden.new_empty(batch, vocab)
        position = torch.empty(batch, vocab, dtype=torch.long, device=hidden.device)
        for start in range(0, vocab, VOCAB_CHUNK):
            end = min(start + VOCAB_CHUNK, vocab)
            logits = (hidden @ w[start:end].T).masked_fill_(off_text, float("-inf"))
            pooled[:, start:end], position[:, start:end] = logits.max(dim=1)   # (bf16 logits under autocast)
        # the bias is the same at every position: added after the max
        if bias is not None:
            pooled += bias.to(pooled.dtype)
        ctx.save_for_backward(hidden, weight, position, torch.isneginf(pooled))
        ctx.has_bias = bias is not None
        return pooled

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, position, empty = ctx.saved_tensors
        batch, length, width = hidden.shape
        grad = grad.masked_fill(empty, 0)              # a text without text tokens pooled nothing
        grad_bias = grad.sum(0).to(weight.dtype) if ctx.has_bias else None
        if int(torch.count_nonzero(grad)) * GATHER_COST > grad.numel() * length:
            return (*_scattered_backward(grad, hidden, weight, position), grad_bias, None)
        rows, terms = grad.nonzero(as_tuple=True)
        values = grad[rows, terms]
        at = rows * length + position[rows, terms]     # flat [B * L] index of each max
        flat_hidden = hidden.reshape(batch * length, width)
        grad_hidden = torch.zeros_like(flat_hidden)
        grad_weight = torch.zeros_like(weight)         # in the weight's precision: summed over many texts
        step = 1 << 16                                 # bounds the [step, H] gathers when every term has a gradient
        for s in range(0, len(values), step):
            v, t, a = values[s:s + step, None], terms[s:s + step], at[s:s + step]
            grad_hidden.index_add_(0, a, v * weight[t].to(v.dtype))
            grad_weight.index_add_(0, t, (v * flat_hidden[a]).to(weight.dtype))
        return grad_hidden.view_as(hidden), grad_weight, grad_bias, None


def _scattered_backward(grad, hidden, weight, position):
    """(grad of hidden, grad of weight) when most terms have a gradient: each vocabulary slice's gradient placed
    at its max positions ([B, L, slice]), then multiplied by the weights and by the hidden states."""
    batch, length, width = hidden.shape
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.empty_like(weight)
    flat_hidden = hidden.reshape(batch * length, width)
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        end = min(start + VOCAB_CHUNK, weight.shape[0])
        placed = hidden.new_zeros(batch, length, end - start)
        placed.scatter_(1, position[:, None, start:end], grad[:, None, start:end].to(hidden.dtype))
        grad_hidden += placed @ weight[start:end].to(hidden.dtype)
        grad_weight[start:end] = (placed.reshape(batch * length, -1).T @ flat_hidden).to(weight.dtype)
    return grad_hidden, grad_weight


def _identity_transform(model):
    """Start a new BERT head's transform (dense -> GELU -> LayerNorm) with the identity as its dense layer (True
    if it could). With the output projection tied to the word embeddings, each position then scores the vocabulary
    by how close its hidden state is to each word's embedding, which puts a text's own words first:
    all-MiniLM-L6-v2 on SciFact, 83% of a passage's 50 heaviest terms are its own tokens, against 1% through a
    random transform."""
    transform = _head_transform(model)
    if transform is None or transform.dense.weight.shape[0] != transform.dense.weight.shape[1]:
        return False                      # another architecture's head: left as transformers made it
    with torch.no_grad():
        transform.dense.weight.copy_(torch.eye(transform.dense.weight.shape[0]))
        transform.dense.bias.zero_()
    return True


def _tie_output_projection(model):
    """Make the MLM output projection share the word embeddings' weight (and say so in the config, so that
    the saved model loads tied)."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True


@contextlib.contextmanager
def quiet_load_report():
    """transformers logs a table of missing / unexpected weights at warning level (the pooler of a BertModel
    checkpoint, the head's new weights); silence it for one load. Its tensor-parallel check warns about every
    layer exactly when that table is silenced (modeling_utils tests `logger.level >= WARNING`), so it goes too."""
    loggers = [logging.getLogger(name) for name in ("transformers.modeling_utils",
                                                    "transformers.distributed.tensor_parallel")]
    levels = [hf_logger.level for hf_logger in loggers]
    for hf_logger in loggers:
        hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for hf_logger, level in zip(loggers, levels):
            hf_logger.setLevel(level)
