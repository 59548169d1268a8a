"""Small BERTs (and T5s) built from nothing but a corpus, for the offline quickstart and the tests.

`build_scratch_model(corpus, out_dir, size="tiny")` builds an uncased WordPiece vocabulary from the
corpus and saves a randomly initialised BertModel with it (a T5Model for the "t5-" sizes), in HF format, so that
every stage (fine-tuning, RetroMAE pretraining, ...) loads it like any hub checkpoint. The same
corpus, size and seed give the same tokenizer and the same weights: a pretrained run and its
no-pretraining control start from one model.

A model spec "scratch:<size>" (e.g. model="scratch:tiny" in a notebook) means "build this here"
(reprolib.modeling.specs).
"""
import shutil
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from reprolib.errors import ReprolibError
from reprolib.fileio import is_built, mark_built

SCRATCH_PREFIX = "scratch:"


class Size(NamedTuple):
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    # words seen fewer times in the corpus are split into pieces (1: every word may be whole; see `_word_piece_vocab`)
    min_word_count: int = 1


SIZES = {
    "micro": Size(2000, 32, 2, 2, 64),     # unit tests: fast, learns little
    "tiny": Size(4000, 128, 2, 2, 512),    # quickstart: learns the synthetic set in a minute on 2 CPU cores
    # for MLM pretraining: rare words (the synthetic entities' names) split into pieces that many words share, as BERT's
    # vocabulary splits rare names, so that masked-word training sees them far more often (bench/README.md, "Rare words")
    "tiny-pieces": Size(2000, 128, 2, 2, 512, min_word_count=100),
    "mini": Size(8000, 256, 4, 4, 1024),
    # encoder-decoder T5 (layers each side) for OpenMatch's T5 recipe; it keeps the WordPiece tokenizer:
    # T5's pad id 0 is [PAD] here, so its first decoder input, 0, is the same token in both.
    "t5-tiny": Size(4000, 128, 2, 2, 512),
}
MAX_POSITIONS = 512
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MANIFEST = "scratch.json"


def is_scratch_spec(model):
    return isinstance(model, str) and model.startswith(SCRATCH_PREFIX)


def scratch_size(spec):
    size = spec[len(SCRATCH_PREFIX):]
    if size not in SIZES:
        raise ReprolibError(f"unknown scratch model {spec!r}; choose from "
                            f"{', '.join(SCRATCH_PREFIX + s for s in SIZES)}")
    return size


def build_scratch_model(corpus, out_dir, size="tiny", seed=42, max_texts=200_000):
    """Save a random-init BERT (or T5) of `size` with a WordPiece vocab trained on (up to `max_texts` of) the corpus.

    Returns `out_dir`. A folder already built with the same size, seed and corpus is reused.
    """
    import torch
    from transformers import BertConfig, BertModel, T5Config, T5Model

    if size not in SIZES:
        raise ReprolibError(f"unknown scratch size {size!r}; choose from {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    # the corpus by content, not by its store's path: machines with copies of the data must agree that a build is done
    recipe = {"size": size, "seed": int(seed), "corpus": getattr(corpus, "fingerprint", None), "num_passages": len(corpus)}
    manifest = out_dir / MANIFEST
    if is_built(manifest, recipe):
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)   # another build's files (a scaled T5's) must not outlive it
    vocab_size, hidden, layers, heads, intermediate, min_word_count = SIZES[size]

    step = max(1, len(corpus) // max_texts)
    vocab = _word_piece_vocab((f"{corpus.title(i)} {corpus.text(i)}" for i in range(0, len(corpus), step)), vocab_size,
                              min_word_count)
    tokenizer = bert_tokenizer(vocab)

    torch.manual_seed(seed)
    if size.startswith("t5-"):
        config = T5Config(vocab_size=len(vocab), d_model=hidden, d_kv=hidden // heads, d_ff=intermediate,
                          num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                          pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.sep_token_id)
        model = T5Model(config)
    else:
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=intermediate,
                            max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id)
        model = BertModel(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    mark_built(manifest, recipe)
    return out_dir


def _word_piece_vocab(texts, vocab_size, min_word_count=1):
    """Specials, every character (alone and as a "##" continuation), then the most frequent words; with
    `min_word_count` > 1 only words seen that often are whole, and the rest of the budget is offered to the
    pieces that split the rarer words: their beginnings (2-5 characters; a rare word that short may stay whole)
    and "##" continuations (2-3), most frequent first, of which those that BERT's greedy longest-match split
    uses are kept. `vocab_size` is then a cap (tiny-pieces: 1,406 of 2,000 on the synthetic corpus).

    Counted in Python rather than with `tokenizers`' WordPiece trainer, whose choice among equally
    frequent merges changes from run to run: the same corpus must give the same vocabulary. Words
    left out are split by BERT's WordPiece into the pieces that are in.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = Counter()
    for text in texts:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    by_frequency = sorted((w for w in words if len(w) > 1 and words[w] >= min_word_count), key=lambda w: (-words[w], w))
    vocab += by_frequency[:max(0, vocab_size - len(vocab))]
    if min_word_count <= 1:
        return vocab
    rare = {word: n for word, n in words.items() if len(word) > 1 and n < min_word_count}
    pieces = Counter()
    for word, n in rare.items():
        for end in range(2, min(5, len(word)) + 1):
            pieces[word[:end]] += n
        for start in range(1, len(word) - 1):
            for length in (2, 3):
                if start + length <= len(word):
                    pieces["##" + word[start:start + length]] += n
    whole = set(vocab)
    ranked = [p for p in sorted(pieces, key=lambda p: (-pieces[p], p)) if p not in whole][:max(0, vocab_size - len(vocab))]
    offered = whole | set(ranked)
    used = {piece for word in rare for piece in _split_word(word, offered)}
    return vocab + [p for p in ranked if p in used]


def _split_word(word, vocab):
    """BERT's WordPiece split of one word: greedy longest match, continuations prefixed "##" (every single
    character is in `vocab`)."""
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start + 1 and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
            end -= 1
        pieces.append(word[start:end] if start == 0 else "##" + word[start:end])
        start = end
    return pieces


def bert_tokenizer(vocab):
    """A fast uncased BERT WordPiece tokenizer over `vocab` (built through `tokenizers`, which reads the
    same in transformers 4 and 5; their BertTokenizerFast constructors take the vocabulary differently)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tokenizer.decoder = decoders.WordPiece()
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True, model_max_length=MAX_POSITIONS,
                             unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                             mask_token="[MASK]")
