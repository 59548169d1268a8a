"""LexMAE pretraining: a masked auto-encoder with a lexicon bottleneck (Shen et al. 2023; docs/recipes.md §4.2).

    encoder   masked text (exactly 30% of the text tokens) --BertForMaskedLM--> MLM logits W [B, L, V],
              encoder MLM loss on the masked positions
    bottleneck v = max of W over the text positions ([CLS]/[SEP]/padding left out)         [B, V]
              (projected and pooled a slice of the vocabulary at a time: W is never whole in memory)
              a = softmax(v), or "logits_sat": log(1 + ReLU(v)) normalised to sum 1      [B, V]
              b = a @ E, E = the word embeddings, detached                               [B, H]
              (bottleneck_layer_norm: b through the embeddings' LayerNorm, not in LexMAE's code; a
              scratch model's E averages to almost 0: b is then thousands of times smaller than the tokens beside it)
    decoder   BertEmbeddings(decoder ids, ~50% masked), position 0 replaced by b
              -> `decoder_layers` new BERT layers (bidirectional, padding mask only)
              -> a new head transform -> E as output projection, with a bias of its own (zeros at first)
              -> decoder MLM loss on the decoder-masked positions
    loss = encoder_weight * encoder MLM + decoder_weight * decoder MLM
    (decoder_weight 0, the MLM-only control: neither the bottleneck nor the decoder is run; they would add
    nothing to the encoder's gradient)

Only the BertForMaskedLM is kept (`save_pretrained`): the decoder exists for pretraining alone, and
the saved checkpoint is what the sparse (SPLADE-style) encoder fine-tunes.
"""
import torch
from torch import nn

from reprolib.errors import ReprolibError
from reprolib.modeling.autoencoder import MaskedAutoEncoder, load_masked_lm
from reprolib.modeling.sparse import max_pooled_projection

BOTTLENECKS = ("softmax", "logits_sat")


class LexMAEForPretraining(MaskedAutoEncoder):
    def __init__(self, lm, decoder_layers=2, bottleneck="softmax", encoder_weight=1.0, decoder_weight=1.0,
                 bottleneck_layer_norm=False):
        """`lm`: a BertForMaskedLM. `bottleneck`: "softmax" (LexMAE's default) or "logits_sat".
        `bottleneck_layer_norm`: put b through the embeddings' LayerNorm, as the tokens beside it are."""
        from transformers.models.bert.modeling_bert import BertLayer, BertPredictionHeadTransform

        super().__init__()
        if bottleneck not in BOTTLENECKS:
            raise ReprolibError(f"unknown bottleneck {bottleneck!r}; choose from {', '.join(BOTTLENECKS)}")
        self.lm = lm
        self.bottleneck_type = bottleneck
        self.bottleneck_layer_norm = bottleneck_layer_norm
        self.encoder_weight, self.decoder_weight = encoder_weight, decoder_weight
        self.decoder = self.decoder_transform = self.decoder_bias = None
        if not decoder_weight:          # the control: no decoder (DDP also refuses parameters that get no gradient)
            return
        self.decoder = nn.ModuleList(BertLayer(lm.config) for _ in range(decoder_layers))
        self.decoder_transform = BertPredictionHeadTransform(lm.config)
        for module in (self.decoder, self.decoder_transform):
            module.apply(lm._init_weights)               # BERT's initialisation (normal, initializer_range)
        # the output projection is the word embeddings (tied), its bias the decoder's own (docs/recipes.md
        # correction 7): the encoder's head bias stays the encoder's
        self.decoder_bias = nn.Parameter(torch.zeros(lm.config.vocab_size))

    @classmethod
    def from_pretrained(cls, name_or_path, new_head="random", dropout=None, **kwargs):
        """`new_head`, `dropout`: how a checkpoint without an MLM head starts one, and the dropout
        probability (None: the config's); see `load_masked_lm`. The decoder takes the encoder's."""
        return cls(load_masked_lm(name_or_path, new_head, dropout), **kwargs)

    def pooled_logits(self, hidden, text_mask):
        """v [B, V]: the max over the text positions (text_mask [B, L], 1 on text) of the encoder's MLM logits,
        from its last hidden states `hidden` [B, L, H]."""
        projection = self.lm.get_output_embeddings()
        v = max_pooled_projection(self.lm.cls.predictions.transform(hidden), projection.weight, projection.bias,
                                  text_mask.bool())
        return v.masked_fill(torch.isneginf(v), 0)       # a sequence without text (never built): a uniform a

    def bottleneck(self, v):
        """(a, b): the lexicon weights a [B, V] from the pooled logits v [B, V], and b = a @ E [B, H] with no
        gradient into E (then LayerNorm(b) under `bottleneck_layer_norm`)."""
        if self.bottleneck_type == "softmax":
            a = v.softmax(dim=-1)
        else:
            saturated = torch.log1p(torch.relu(v))
            a = saturated / (saturated.sum(dim=-1, keepdim=True) + 1e-4)
        b = a @ self.lm.get_input_embeddings().weight.detach()
        return a, self.lm.bert.embeddings.LayerNorm(b) if self.bottleneck_layer_norm else b

    def forward(self, encoder_input_ids, encoder_labels, attention_mask, decoder_input_ids=None, decoder_labels=None,
                text_mask=None):
        """Returns (total loss, encoder MLM loss, decoder MLM loss); the decoder loss is None for the MLM-only
        control."""
        encoded = self.lm.bert(input_ids=encoder_input_ids, attention_mask=attention_mask).last_hidden_state
        encoder_loss = self.mlm_loss(encoded, encoder_labels, self.lm.cls)
        if not self.decoder_weight:
            return self.encoder_weight * encoder_loss, encoder_loss, None
        _, b = self.bottleneck(self.pooled_logits(encoded, text_mask))
        embedded = self.lm.bert.embeddings(input_ids=decoder_input_ids)
        hidden = torch.cat([b.unsqueeze(1).to(embedded.dtype), embedded[:, 1:]], dim=1)
        # additive padding mask [B, 1, 1, L]: the form BERT's eager and SDPA attention take
        padding = torch.zeros(attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        padding = padding.masked_fill(attention_mask == 0, torch.finfo(hidden.dtype).min)[:, None, None, :]
        for layer in self.decoder:
            hidden = layer(hidden, attention_mask=padding)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden      # a tuple before transformers 5
        words = self.lm.get_input_embeddings().weight
        decoder_head = lambda h: nn.functional.linear(self.decoder_transform(h), words, self.decoder_bias)  # noqa: E731
        decoder_loss = self.mlm_loss(hidden, decoder_labels, decoder_head)
        total = self.encoder_weight * encoder_loss + self.decoder_weight * decoder_loss
        return total, encoder_loss, decoder_loss
