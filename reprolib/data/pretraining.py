"""Pretraining text: a corpus as token sequences, and masked examples drawn from them.

RetroMAE (docs/recipes.md §1.1, preprocess.py): each passage is rendered (on MS MARCO: title + " " + text
when the title is longer than two characters, the `retromae_pretrain` template) and tokenized without
special tokens. On MS MARCO one passage is one sequence (`pack=False`, the default). On Wikipedia and
BookCorpus text (`pack=True`) pieces are packed greedily: a block is emitted when it already holds at least
max_seq_length - 2 tokens *before* the next piece would be appended, so a block can run over. Either way
`to_sequence` cuts the sequence to max_seq_length and adds [CLS] / [SEP].

LexMAE (§4.1, correction 7): each passage is one sequence `title[SEP]passage` ("-" for an empty title, the
`lexmae` template), one segment, cut at the end to max_seq_length; no packing.

`PretrainingExamples[i]` masks sequence i afresh from (seed, epoch, i): every process and every
resume sees the same masks, as the training groups do.
"""
import numpy as np

from reprolib.data.masking import collate_lexmae, collate_retromae, lexmae_example, retromae_example
from reprolib.data.templates import get_template

METHODS = ("retromae", "lexmae")


def passage_texts(corpus, template="retromae_pretrain", limit=None, sep="[SEP]"):
    """The corpus's passages (the first `limit`) as pretraining text."""
    tpl = get_template(template) if isinstance(template, str) else template
    for i in range(min(len(corpus), limit or len(corpus))):
        yield tpl.render(corpus.title(i), corpus.text(i), sep=sep)


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


def _tokenized(tokenizer, texts, batch_size=1000, **kwargs):
    """input_ids of each text (or pair), tokenized in batches for the fast tokenizer's parallelism."""
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode_batch(tokenizer, batch, **kwargs)
            batch = []
    if batch:
        yield from _encode_batch(tokenizer, batch, **kwargs)


def _encode_batch(tokenizer, batch, **kwargs):
    return tokenizer(batch, **kwargs)["input_ids"]


def build_sequences(corpus, tokenizer, method, max_seq_length, template=None, limit=None, progress=False,
                    pack=False):
    """The corpus (its first `limit` passages) as a list of int32 id arrays with specials, ready to mask
    (see the module docstring; `pack` applies to RetroMAE only)."""
    from reprolib.progress import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    texts = passage_texts(corpus, template or ("retromae_pretrain" if method == "retromae" else "lexmae"), limit,
                          sep=tokenizer.sep_token)
    texts = tqdm(texts, total=min(len(corpus), limit or len(corpus)), desc="tokenize", unit="passage", disable=not progress, mininterval=1.0)
    if method == "lexmae":
        ids = _tokenized(tokenizer, texts, truncation=True, max_length=max_seq_length)
        return [np.asarray(seq, dtype=np.int32) for seq in ids]
    pieces = _tokenized(tokenizer, texts, add_special_tokens=False)
    return [np.asarray(to_sequence(block, tokenizer.cls_token_id, tokenizer.sep_token_id, max_seq_length),
                       dtype=np.int32)
            for block in (pack_blocks(pieces, max_seq_length) if pack else pieces)]


class PretrainingExamples:
    """`examples[i]` -> the masked example of sequence i (`retromae_example` or `lexmae_example`)."""

    def __init__(self, sequences, tokenizer, method, encoder_ratio=0.3, decoder_ratio=0.5, seed=42):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        self.sequences = sequences
        self.tokenizer = tokenizer
        self.method = method
        self.encoder_ratio, self.decoder_ratio = encoder_ratio, decoder_ratio
        self.seed = int(seed)
        self.epoch = 0
        # LexMAE's specials are the tokens with no word (word_ids() is None): [CLS], [SEP] and padding; [UNK] is text
        self.special_ids = np.asarray([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])

    def __len__(self):
        return len(self.sequences)

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __getitem__(self, index):
        ids = self.sequences[index].astype(np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        vocab_size = len(self.tokenizer)
        if self.method == "retromae":
            tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
            return retromae_example(ids, tokens, self.tokenizer.mask_token_id, vocab_size, rng,
                                    encoder_ratio=self.encoder_ratio, decoder_ratio=self.decoder_ratio)
        special_mask = np.isin(ids, self.special_ids).astype(np.int64)
        return lexmae_example(ids, special_mask, self.tokenizer.mask_token_id, vocab_size, rng,
                              encoder_ratio=self.encoder_ratio, decoder_ratio=self.decoder_ratio)

    def collate(self, examples):
        collate = collate_retromae if self.method == "retromae" else collate_lexmae
        return collate(examples, self.tokenizer.pad_token_id)
