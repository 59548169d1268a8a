"""What the RetroMAE and LexMAE pretraining models share: a BertForMaskedLM encoder `lm` that is the only
part kept, and an MLM loss computed at the labelled positions only."""
import logging

import torch.nn.functional as F
from torch import nn

from reprolib.data.masking import IGNORE


NEW_HEADS = ("random", "identity")


def load_masked_lm(name_or_path, new_head="random", dropout=None, next_sentence=False):
    """A BertForMaskedLM. A checkpoint without an MLM head (all-MiniLM-L6-v2, scratch models) gets transformers'
    random one, or with new_head="identity" the sparse encoder's start: an identity transform and the output
    projection tied to the word embeddings, so that each position first predicts the words its hidden state is
    closest to (`reprolib.modeling.sparse`). `dropout` sets every dropout probability (None: the config's).
    With `next_sentence`, a BertForPreTraining: the same MLM head (`cls.predictions`) and BERT's next-sentence
    head, its pooler and classifier (kept from the checkpoint, else new), which a sequence classifier (the
    cross-encoder) loads its pooler from."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    from reprolib.errors import ReprolibError
    from reprolib.modeling.encoder import set_dropout
    from reprolib.modeling.sparse import _identity_transform, _tie_output_projection, quiet_load_report

    if new_head not in NEW_HEADS:
        raise ReprolibError(f"new_head must be one of {', '.join(NEW_HEADS)}, not {new_head!r}")
    config = set_dropout(BertConfig.from_pretrained(str(name_or_path)), dropout)
    with quiet_load_report():
        lm, info = (BertForPreTraining if next_sentence else BertForMaskedLM).from_pretrained(
            str(name_or_path), config=config, output_loading_info=True)
    if any(key.startswith("cls.predictions") for key in info["missing_keys"]):
        if new_head == "identity":
            _tie_output_projection(lm)
            _identity_transform(lm)
        logging.getLogger(__name__).warning("%s has no MLM head: added one (%s start)", name_or_path, new_head)
    return lm


class MaskedAutoEncoder(nn.Module):
    """Base of RetroMAEForPretraining and LexMAEForPretraining; subclasses set `self.lm` and add a decoder."""

    @staticmethod
    def mlm_loss(hidden, labels, head):
        """Mean cross entropy of `head` (hidden -> vocabulary logits) at the labelled positions. The head, a
        |V|-wide projection and the costliest layer of a small BERT, runs there only: HF's BertForMaskedLM
        scores every position, though only the masked ones count."""
        labelled = labels != IGNORE
        if not labelled.any():   # whole-word masking can mask nothing in a short batch: 0, not cross_entropy's NaN
            return hidden.sum() * 0.0
        return F.cross_entropy(head(hidden[labelled]), labels[labelled])

    def gradient_checkpointing_enable(self):
        """Recompute the encoder's activations in backward (the new decoder layers are cheap to keep)."""
        from reprolib.modeling.encoder import enable_gradient_checkpointing

        enable_gradient_checkpointing(self.lm)

    def save_pretrained(self, path, tokenizer=None):
        """The encoder alone, as an HF BertForMaskedLM (+ tokenizer): the decoder is pretraining scaffolding. (A
        BertForPreTraining, with next-sentence prediction, is saved with its pooler and classifier.)"""
        self.lm.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path


def masked_token_accuracy(lm, examples, batch_size=32):
    """Share of the encoder-masked tokens of `examples` (a PretrainingExamples) that `lm`, a BertForMaskedLM,
    predicts exactly. Averaged over every masked token of every example, so one sequence's luck does not count."""
    import torch

    was_training, device = lm.training, next(lm.parameters()).device
    lm.eval()
    hits = total = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            batch = {key: value.to(device) for key, value in batch.items()}
            labels = batch["encoder_labels"]
            masked = labels != IGNORE
            hidden = lm.bert(input_ids=batch["encoder_input_ids"],
                             attention_mask=batch["attention_mask"]).last_hidden_state
            predicted = lm.cls(hidden[masked]).argmax(-1)
            hits += int((predicted == labels[masked]).sum())
            total += int(masked.sum())
    lm.train(was_training)
    return hits / max(total, 1)
