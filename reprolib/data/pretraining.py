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

BERT's next-sentence prediction (RetroMAE's sequences, `nsp=True`, one passage each; RetroMAE continues a BERT
pretrained with it): each passage is cut after its first sentence into A and B, and half the time B is replaced
by another passage's B; the example is [CLS] A [SEP] B [SEP] with token types 0 / 1 and `next_sentence_label` 1
where B was replaced (BERT's labels: 0 = IsNext). The pairing draws from a random stream of its own, so the
masks' stream is the one drawn without it.
"""
import numpy as np

from reprolib.data.masking import IGNORE, collate_lexmae, collate_retromae, lexmae_example, retromae_example
from reprolib.data.templates import get_template

METHODS = ("retromae", "lexmae")


def passage_texts(corpus, template="retromae_pretrain", limit=None, sep="[SEP]"):
    """The corpus's passages (the first `limit`) as pretraining text."""
    tpl = get_template(template)
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
    """input_ids of each text, tokenized in batches for the fast tokenizer's parallelism."""
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from tokenizer(batch, **kwargs)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, **kwargs)["input_ids"]


class PassageSequences:
    """`sequences[i]`: passage i as an int32 id array with specials, tokenized when asked for.

    Nothing is tokenized up front, so start-up time and memory stay flat in the corpus size: MS MARCO's 8.8M
    passages would take about 16 minutes of one core and some 3 GB of small arrays, in every process, before
    the first step (bench/README.md, "Paper scale"). A training step tokenizes only its own batch (~0.1-0.2 ms
    a passage). Both methods cut at the end: [CLS] + the first max_seq_length - 2 ids + [SEP], which is what the
    tokenizer's own truncation does to LexMAE's single segment `title[SEP]passage`."""

    def __init__(self, corpus, tokenizer, template, max_seq_length, limit=None):
        self.corpus, self.tokenizer, self.max_seq_length = corpus, tokenizer, max_seq_length
        self.template = get_template(template)
        self.size = min(len(corpus), limit or len(corpus))

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not -self.size <= index < self.size:
            raise IndexError(f"sequence {index} of {self.size}")
        index %= self.size
        text = self.template.render(self.corpus.title(index), self.corpus.text(index), sep=self.tokenizer.sep_token)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(to_sequence(ids, self.tokenizer.cls_token_id, self.tokenizer.sep_token_id,
                                      self.max_seq_length), dtype=np.int32)


def build_sequences(corpus, tokenizer, method, max_seq_length, template=None, limit=None, progress=False,
                    pack=False):
    """The corpus (its first `limit` passages) as id arrays with specials, ready to mask (see the module
    docstring): a `PassageSequences`, or with `pack` (RetroMAE only) a list of blocks built up front, since
    packing reads the corpus in order."""
    from reprolib.progress import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    template = template or ("retromae_pretrain" if method == "retromae" else "lexmae")
    if not (pack and method == "retromae"):
        return PassageSequences(corpus, tokenizer, template, max_seq_length, limit)
    texts = passage_texts(corpus, template, limit, sep=tokenizer.sep_token)
    texts = tqdm(texts, total=min(len(corpus), limit or len(corpus)), desc="tokenize", unit="passage",
                 disable=not progress, mininterval=1.0)
    pieces = _tokenized(tokenizer, texts, add_special_tokens=False)
    return [np.asarray(to_sequence(block, tokenizer.cls_token_id, tokenizer.sep_token_id, max_seq_length),
                       dtype=np.int32)
            for block in pack_blocks(pieces, max_seq_length)]


def split_after_first_sentence(tokens):
    """Where to cut a passage's tokens (no specials) into A and B: after its first "." that leaves B a token, else
    at the word boundary nearest the middle; None when the passage is one word."""
    for i, token in enumerate(tokens[:-1]):
        if token == ".":
            return i + 1
    starts = [i for i, token in enumerate(tokens) if i and not token.startswith("##")]
    return min(starts, key=lambda i: abs(i - len(tokens) / 2)) if starts else None


class PretrainingExamples:
    """`examples[i]` -> the masked example of sequence i (`retromae_example` or `lexmae_example`)."""

    def __init__(self, sequences, tokenizer, method, encoder_ratio=0.3, decoder_ratio=0.5, seed=42, decoder=True,
                 nsp=False):
        """decoder=False: the encoder's half of each example only (the MLM-only control, which runs no decoder).
        nsp: sentence pairs for BERT's next-sentence prediction (see the module docstring)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if nsp and (method != "retromae" or not isinstance(sequences, PassageSequences)):
            raise ValueError("next-sentence prediction pairs the sentences of one passage: RetroMAE's "
                             "sequences, unpacked")
        self.nsp = nsp
        self.sequences = sequences
        self.tokenizer = tokenizer
        self.method = method
        self.encoder_ratio, self.decoder_ratio = encoder_ratio, decoder_ratio
        self.seed = int(seed)
        self.decoder = decoder
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
            pair = self._sentence_pair(ids, index) if self.nsp else None
            if pair:
                ids = pair[0]
            tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
            example = retromae_example(ids, tokens, self.tokenizer.mask_token_id, vocab_size, rng,
                                       encoder_ratio=self.encoder_ratio, decoder_ratio=self.decoder_ratio,
                                       decoder=self.decoder)
            if pair:
                example.update(token_type_ids=pair[1], next_sentence_label=pair[2])
            return example
        special_mask = np.isin(ids, self.special_ids).astype(np.int64)
        return lexmae_example(ids, special_mask, self.tokenizer.mask_token_id, vocab_size, rng,
                              encoder_ratio=self.encoder_ratio, decoder_ratio=self.decoder_ratio, decoder=self.decoder)

    def _halves(self, ids):
        """(A, B) of a sequence's body cut to fit a pair's three specials, or None when it cannot be cut."""
        body = ids[1:-1][:self.sequences.max_seq_length - 3]
        cut = split_after_first_sentence(self.tokenizer.convert_ids_to_tokens(body.tolist()))
        return (body[:cut], body[cut:]) if cut else None

    def _sentence_pair(self, ids, index):
        """(ids, token types, label) of [CLS] A [SEP] B [SEP], B replaced by another passage's with probability
        0.5 (label 1) and cut to the length limit. A one-word passage stays whole, its label ignored."""
        halves = self._halves(ids)
        if halves is None:
            return ids, np.zeros(len(ids), dtype=np.int64), IGNORE
        a, b = halves                                           # both non-empty, and they fit
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])    # not the masks' stream
        label = int(rng.random() < 0.5 and len(self.sequences) > 1)
        if label:
            other = int(rng.integers(len(self.sequences) - 1))
            other += other >= index % len(self.sequences)                      # any sequence but this one
            other_ids = self.sequences[other].astype(np.int64)
            halves = self._halves(other_ids)
            b = halves[1] if halves else other_ids[1:-1]
            b = b[:self.sequences.max_seq_length - 3 - len(a)]
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        pair = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int64)
        types = (np.arange(len(pair)) > len(a) + 1).astype(np.int64)
        return pair, types, label

    def collate(self, examples):
        collate = collate_retromae if self.method == "retromae" else collate_lexmae
        return collate(examples, self.tokenizer.pad_token_id)
