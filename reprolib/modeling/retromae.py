"""RetroMAE pretraining with enhanced decoding (Xiao et al. 2022; docs/recipes.md §1.2).

    masked text --BertForMaskedLM--> encoder MLM loss, and h = last hidden state at [CLS]
    query stream   H1 = h + P[0..L-1]                         (raw position embeddings)
    key/value      H2 = BertEmbeddings(original ids), H2[0] = h
    one new layer  A = LN(H1 + Attn(Q=H1, K=H2, V=H2, visibility)); out = LN(A + FFN(A))
    the encoder's MLM head on `out` -> decoder loss over every token but the first and last
    loss = encoder MLM + decoder_weight x decoder (+ nsp_weight x next-sentence prediction, BERT's, on [CLS])
With decoder_weight 0 (the MLM-only control) the decoder is not run: its loss would add nothing to the
encoder's gradient, so the control is MLM pretraining alone, for the same steps, in less time.

Only the BertForMaskedLM is kept (`save_pretrained`); the decoder layer exists for pretraining alone, so the
saved checkpoint is what `DenseEncoder.from_pretrained` fine-tunes. A "BERT" pretrained with nsp_weight > 0 is a
BertForPreTraining, saved with its next-sentence head (pooler and classifier) for a continuation or a
cross-encoder to start from.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from reprolib.data.masking import IGNORE
from reprolib.modeling.autoencoder import MaskedAutoEncoder, load_masked_lm


class EnhancedDecoderLayer(nn.Module):
    """A BERT layer whose queries come from one stream and keys/values from another; the attention
    residual is added to the query stream."""

    def __init__(self, config):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.activation = nn.GELU()
        for module in self.modules():                    # BERT's initialisation
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.initializer_range)
                nn.init.zeros_(module.bias)

    def _split(self, x):
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query_stream, key_value_stream, visibility):
        """visibility: [B, L, L], 1 where row i may attend to column j."""
        q, k, v = self._split(self.query(query_stream)), self._split(self.key(key_value_stream)), \
            self._split(self.value(key_value_stream))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        blocked = (visibility == 0).unsqueeze(1)
        scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        attention = self.attention_dropout(scores.softmax(dim=-1)) @ v
        attention = attention.transpose(1, 2).reshape(query_stream.shape)
        hidden = self.attention_norm(query_stream + self.dropout(self.attention_output(attention)))
        return self.output_norm(hidden + self.dropout(self.output(self.activation(self.intermediate(hidden)))))


class RetroMAEForPretraining(MaskedAutoEncoder):
    def __init__(self, lm, decoder_weight=1.0, nsp_weight=0.0):
        """`lm`: a BertForMaskedLM (its MLM head is shared by the decoder). `decoder_weight` 0 makes the MLM-only
        control: the same encoder, masks, data and steps, and no decoder. `nsp_weight` > 0 adds BERT's
        next-sentence prediction on sentence pairs (`PretrainingExamples(nsp=True)`); `lm` is then a
        BertForPreTraining, which holds its head."""
        super().__init__()
        self.lm = lm
        self.decoder_weight, self.nsp_weight = decoder_weight, nsp_weight
        # none for the control (DDP also refuses parameters that get no gradient)
        self.decoder = EnhancedDecoderLayer(lm.config) if decoder_weight else None
        if nsp_weight and not hasattr(lm.cls, "seq_relationship"):
            raise ValueError("next-sentence prediction needs a BertForPreTraining (load_masked_lm(next_sentence=True))")

    @classmethod
    def from_pretrained(cls, name_or_path, decoder_weight=1.0, nsp_weight=0.0, new_head="random", dropout=None):
        """`new_head`, `dropout`: how a checkpoint without an MLM head starts one, and the dropout
        probability (None: the config's); see `load_masked_lm`. The decoder takes the encoder's."""
        return cls(load_masked_lm(name_or_path, new_head, dropout, next_sentence=bool(nsp_weight)),
                   decoder_weight=decoder_weight, nsp_weight=nsp_weight)

    def forward(self, encoder_input_ids, encoder_labels, attention_mask, decoder_input_ids=None,
                decoder_visibility=None, decoder_labels=None, token_type_ids=None, next_sentence_label=None):
        """Returns (total loss, encoder MLM loss, decoder loss, next-sentence loss); the decoder loss is None for
        the MLM-only control, the next-sentence loss None without nsp_weight."""
        encoded = self.lm.bert(input_ids=encoder_input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids)
        hidden = encoded.last_hidden_state
        encoder_loss = self.mlm_loss(hidden, encoder_labels, self.lm.cls.predictions)
        total, decoder_loss, nsp_loss = encoder_loss, None, None
        if self.decoder_weight:
            decoder_loss = self.decode(hidden[:, :1], decoder_input_ids, decoder_visibility, decoder_labels)
            total = total + self.decoder_weight * decoder_loss
        if self.nsp_weight:
            logits = self.lm.cls.seq_relationship(encoded.pooler_output)          # BERT's: tanh(W h_[CLS]) -> 2
            labelled = next_sentence_label != IGNORE                             # a one-word passage has none
            nsp_loss = F.cross_entropy(logits[labelled], next_sentence_label[labelled]) if labelled.any() \
                else logits.sum() * 0.0
            total = total + self.nsp_weight * nsp_loss
        return total, encoder_loss, decoder_loss, nsp_loss

    def decode(self, h, decoder_input_ids, decoder_visibility, decoder_labels):
        """The decoder's loss rebuilding the passage from the sentence embedding `h` [B, 1, H] (a probe may pass
        another passage's: bench/retromae_bottleneck.py)."""
        embeddings = self.lm.bert.embeddings
        key_value = torch.cat([h, embeddings(input_ids=decoder_input_ids)[:, 1:]], dim=1)
        length = decoder_input_ids.shape[1]
        query = h + embeddings.position_embeddings.weight[:length].unsqueeze(0)
        decoded = self.decoder(query, key_value, decoder_visibility)
        return self.mlm_loss(decoded, decoder_labels, self.lm.cls.predictions)
