"""Pretraining text: a corpus packed into blocks of token ids (RECIPES.md §1.1, RetroMAE preprocess.py).

Each passage is rendered (RetroMAE on MS MARCO: title + " " + text when the title is longer than two
characters, the `retromae_pretrain` template) and tokenized without special tokens. Pieces are packed
greedily: a block is emitted when it already holds at least max_seq_length - 2 tokens *before* the next
piece would be appended, so a block can run over; `to_sequence` cuts it and adds [CLS] / [SEP].
"""
from reprolib.data.templates import get_template


def passage_texts(corpus, template="retromae_pretrain"):
    """The corpus's passages as pretraining text, in corpus order."""
    tpl = get_template(template)
    for i in range(len(corpus)):
        yield tpl.render(corpus.title(i), corpus.text(i), sep=" ")


def pack_blocks(token_id_lists, max_seq_length):
    """Greedy packing of token-id lists into blocks of at least max_seq_length - 2 ids (the last may be shorter)."""
    target = max_seq_length - 2
    block = []
    for ids in token_id_lists:
        if len(block) >= target:
            yield block
            block = []
        block = block + list(ids)
    if block:
        yield block


def to_sequence(block, cls_id, sep_id, max_seq_length):
    """[CLS] + the block cut to max_seq_length - 2 + [SEP]."""
    return [cls_id] + list(block[:max_seq_length - 2]) + [sep_id]
