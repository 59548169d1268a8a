"""What the RetroMAE and LexMAE pretraining models share: a BertForMaskedLM encoder `lm` that is the only
part kept, and an MLM loss computed at the labelled positions only."""
import torch.nn.functional as F
from torch import nn

from reprolib.data.masking import IGNORE


class MaskedAutoEncoder(nn.Module):
    """Base of RetroMAEForPretraining and LexMAEForPretraining; subclasses set `self.lm` and add a decoder."""

    @staticmethod
    def mlm_loss(hidden, labels, head):
        """Mean cross entropy of `head` (hidden -> vocabulary logits) at the labelled positions. The head, a
        |V|-wide projection and the costliest layer of a small BERT, runs there only: HF's BertForMaskedLM
        scores every position, though only the masked ones count."""
        labelled = labels != IGNORE
        return F.cross_entropy(head(hidden[labelled]), labels[labelled])

    def gradient_checkpointing_enable(self):
        """Recompute the encoder's activations in backward (the new decoder layers are cheap to keep)."""
        from reprolib.modeling.encoder import enable_gradient_checkpointing

        enable_gradient_checkpointing(self.lm)

    def save_pretrained(self, path, tokenizer=None):
        """The encoder alone, as an HF BertForMaskedLM (+ tokenizer): the decoder is pretraining scaffolding."""
        self.lm.save_pretrained(str(path))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
        return path
