"""Masks for masked-auto-encoder pretraining: whole-word sampling as HF's DataCollatorForWholeWordMask
does it (transformers 4.34, which RetroMAE pins), BERT's 80/10/10 corruption, RetroMAE's
position-specific decoder attention (docs/recipes.md §1.2), and LexMAE's exact-count token masks with a
wider decoder mask (§4.1-4.2).

A sequence is a list of token ids [CLS] t1 .. tn [SEP] (LexMAE: [CLS] title [SEP] passage [SEP]);
`tokens` are its token strings, where a "##" piece continues the previous word, and `special_mask`
marks its [CLS]/[SEP]s with 1. Masks are 0/1 numpy arrays over the L positions.
"""
import math

import numpy as np

IGNORE = -100   # label of positions that carry no loss (torch's cross-entropy default)
MAX_PREDICTIONS = 512


def word_groups(tokens, special_tokens=("[CLS]", "[SEP]", "[PAD]")):
    """Positions grouped into whole words: a "##" piece joins the word before it; specials belong to none."""
    groups = []
    for i, token in enumerate(tokens):
        if token in special_tokens:
            continue
        if groups and token.startswith("##") and groups[-1][-1] == i - 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def whole_word_masks(groups, length, ratio, rng, count=1):
    """[count, length] 0/1 masks, each choosing whole words until round(length * ratio) positions (at least 1,
    at most 512).

    `length` counts the special tokens, as HF does. Each mask takes the words in its own random order; a word
    that would overshoot the count is skipped, so a long word can leave a mask a little short. The masks are
    built side by side, one word rank at a time: RetroMAE's decoder needs one per position.
    """
    target = min(MAX_PREDICTIONS, max(1, int(round(length * ratio))))
    if not groups:
        return np.zeros((count, length), dtype=np.int64)
    sizes = np.array([len(group) for group in groups])
    # member[g, i] = 1 where word g holds position i; float32 so that the product below runs on BLAS
    member = np.zeros((len(groups), length), dtype=np.float32)
    for g, group in enumerate(groups):
        member[g, group] = 1
    # a random word order per mask, drawn as one permutation each: the same draws as masks built one at a time
    order = np.stack([rng.permutation(len(groups)) for _ in range(count)])
    chosen = np.zeros((count, len(groups)), dtype=np.float32)
    covered = np.zeros(count, dtype=np.int64)
    rows = np.arange(count)
    for rank in range(len(groups)):
        if (covered == target).all():                              # every mask is full: no word fits any more
            break
        word = order[:, rank]
        fits = covered + sizes[word] <= target
        chosen[rows, word] = fits
        covered += fits * sizes[word]
    return (chosen @ member).astype(np.int64)                     # words never overlap: 0 or 1


def whole_word_mask(groups, length, ratio, rng):
    """One mask of `whole_word_masks`, [length]."""
    return whole_word_masks(groups, length, ratio, rng)[0]


def corrupt(ids, mask, mask_id, vocab_size, rng):
    """BERT corruption of the masked positions: 80% [MASK], 10% a random token, 10% unchanged.
    Returns (input ids, labels): labels hold the original ids at masked positions, IGNORE elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.where(mask == 1, ids, IGNORE)
    inputs = ids.copy()
    draw = rng.random(len(ids))
    to_mask = (mask == 1) & (draw < 0.8)
    to_random = (mask == 1) & (draw >= 0.8) & (draw < 0.9)
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    return inputs, labels


def decoder_visibility(groups, length, ratio, rng, pool_size=256):
    """RetroMAE's enhanced-decoding attention, [L, L] with 1 = row i may attend to column j.

    A pool of min(L, pool_size) whole-word masks at `ratio` is drawn; each row takes one at random and
    also hides its own position. [CLS] (position 0, which carries the sentence embedding h) is never in
    a word group, so every other row sees it.
    """
    pool = whole_word_masks(groups, length, ratio, rng, count=min(length, pool_size))
    hidden = pool[rng.integers(0, len(pool), size=length)]
    hidden[np.arange(length), np.arange(length)] = 1
    return 1 - hidden


def retromae_example(ids, tokens, mask_id, vocab_size, rng, encoder_ratio=0.3, decoder_ratio=0.5, decoder=True):
    """One RetroMAE pretraining example from a sequence with its specials.

    encoder_input_ids / encoder_labels: whole-word masking at `encoder_ratio`, BERT corruption;
    decoder_input_ids: the original ids (the decoder hides tokens through attention, never by [MASK]);
    decoder_visibility: [L, L] (see `decoder_visibility`);
    decoder_labels: every original token except the first and the last.
    With decoder=False (the MLM-only control) the encoder's half alone, drawn exactly as with the decoder's.
    """
    ids = np.asarray(ids, dtype=np.int64)
    length = len(ids)
    groups = word_groups(tokens)
    encoder_input_ids, encoder_labels = corrupt(ids, whole_word_mask(groups, length, encoder_ratio, rng),
                                                mask_id, vocab_size, rng)
    if not decoder:
        return {"encoder_input_ids": encoder_input_ids, "encoder_labels": encoder_labels}
    decoder_labels = ids.copy()
    decoder_labels[[0, length - 1]] = IGNORE
    return {"encoder_input_ids": encoder_input_ids, "encoder_labels": encoder_labels, "decoder_input_ids": ids,
            "decoder_visibility": decoder_visibility(groups, length, decoder_ratio, rng),
            "decoder_labels": decoder_labels}


def exact_token_mask(special_mask, ratio, rng):
    """0/1 mask of exactly ceil(n * ratio) of the n non-special positions, drawn uniformly (LexMAE's
    token-level `fix_tgt_num`). The product is a float, as in LexMAE, so n = 10 at 0.3 masks 4."""
    special_mask = np.asarray(special_mask)
    candidates = np.flatnonzero(special_mask == 0)
    mask = np.zeros(len(special_mask), dtype=np.int64)
    mask[rng.choice(candidates, math.ceil(len(candidates) * ratio), replace=False)] = 1
    return mask


def lexmae_example(ids, special_mask, mask_id, vocab_size, rng, encoder_ratio=0.3, decoder_ratio=0.5, decoder=True):
    """One LexMAE pretraining example from a sequence with its specials.

    encoder_input_ids / encoder_labels: `exact_token_mask` at `encoder_ratio`, BERT corruption;
    decoder_input_ids / decoder_labels: the encoder's mask plus each other text position with probability
    (decoder_ratio - encoder_ratio) / (1 - encoder_ratio), so about `decoder_ratio` in all, corrupted
    afresh from the original ids; labels only at the masked positions.
    special_mask is kept for `collate_lexmae`'s text mask.
    With decoder=False (the MLM-only control) the encoder's half alone, drawn exactly as with the decoder's.
    """
    ids = np.asarray(ids, dtype=np.int64)
    special_mask = np.asarray(special_mask, dtype=np.int64)
    encoder_mask = exact_token_mask(special_mask, encoder_ratio, rng)
    encoder_input_ids, encoder_labels = corrupt(ids, encoder_mask, mask_id, vocab_size, rng)
    if not decoder:
        return {"encoder_input_ids": encoder_input_ids, "encoder_labels": encoder_labels}
    extra_rate = (decoder_ratio - encoder_ratio) / (1 - encoder_ratio)      # of the text the encoder left
    decoder_mask = encoder_mask | ((rng.random(len(ids)) < extra_rate) & (special_mask == 0))
    decoder_input_ids, decoder_labels = corrupt(ids, decoder_mask, mask_id, vocab_size, rng)
    return {"encoder_input_ids": encoder_input_ids, "encoder_labels": encoder_labels,
            "decoder_input_ids": decoder_input_ids, "decoder_labels": decoder_labels, "special_mask": special_mask}


def _pad(rows, fill):
    """The rows as one [len(rows), longest] int64 tensor, right-padded with `fill`."""
    import torch

    out = np.full((len(rows), max(len(r) for r in rows)), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return torch.from_numpy(out)


def _collate_masked(examples, pad_id):
    """What both methods' batches hold: encoder and decoder ids (padded with pad_id) and labels (with
    IGNORE; the decoder's only where the examples have them), and the attention mask."""
    batch = {key: _pad([e[key] for e in examples], fill)
             for key, fill in (("encoder_input_ids", pad_id), ("encoder_labels", IGNORE),
                               ("decoder_input_ids", pad_id), ("decoder_labels", IGNORE)) if key in examples[0]}
    batch["attention_mask"] = _pad([np.ones(len(e["encoder_input_ids"])) for e in examples], 0)
    return batch


def collate_retromae(examples, pad_id):
    """Pad a list of `retromae_example`s into tensors; padded columns of the visibility are invisible. Examples
    with sentence pairs (`PretrainingExamples(nsp=True)`) add token_type_ids and next_sentence_label."""
    import torch

    batch = _collate_masked(examples, pad_id)
    if "next_sentence_label" in examples[0]:
        batch["token_type_ids"] = _pad([e["token_type_ids"] for e in examples], 0)
        batch["next_sentence_label"] = torch.tensor([e["next_sentence_label"] for e in examples])
    if "decoder_visibility" not in examples[0]:                   # the MLM-only control
        return batch
    width = batch["attention_mask"].shape[1]
    visibility = np.zeros((len(examples), width, width), dtype=np.int64)
    for r, e in enumerate(examples):
        n = len(e["decoder_input_ids"])
        visibility[r, :n, :n] = e["decoder_visibility"]
    batch["decoder_visibility"] = torch.from_numpy(visibility)
    return batch


def collate_lexmae(examples, pad_id):
    """Pad a list of `lexmae_example`s into tensors, with text_mask = attention_mask minus the specials
    (the positions the lexicon bottleneck pools over)."""
    batch = _collate_masked(examples, pad_id)
    if "special_mask" not in examples[0]:                         # the MLM-only control
        return batch
    batch["text_mask"] = _pad([1 - e["special_mask"] for e in examples], 0)
    return batch
