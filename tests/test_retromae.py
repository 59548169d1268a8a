"""RetroMAE pretraining: whole-word masking counts and grouping, BERT corruption, every decoder attention
row, labels, and a loss that falls on the synthetic corpus with a micro BERT built from it."""
import numpy as np
import pytest

from reprolib.data.masking import (IGNORE, collate_retromae, corrupt, decoder_visibility, retromae_example,
                                   whole_word_mask, whole_word_masks, word_groups)

TOKENS = ["[CLS]", "the", "sed", "##uku", "oxide", "was", "found", "in", "17", "##76", "by", "kis", "##tol", "[SEP]"]


def test_word_groups_join_continuation_pieces_and_skip_specials():
    assert word_groups(TOKENS) == [[1], [2, 3], [4], [5], [6], [7], [8, 9], [10], [11, 12]]


def test_whole_word_mask_count_ratio_and_whole_words():
    rng = np.random.default_rng(0)
    groups = word_groups(TOKENS)
    target = round(len(TOKENS) * 0.3)                  # L counts [CLS] and [SEP]: 14 * 0.3 -> 4
    counts = []
    for _ in range(2000):
        mask = whole_word_mask(groups, len(TOKENS), 0.3, rng)
        assert mask[0] == 0 and mask[-1] == 0          # specials are never candidates
        for group in groups:                           # a word is masked whole or not at all
            assert len(set(mask[group])) == 1
        counts.append(mask.sum())
    assert max(counts) == target and np.mean(counts) > target - 0.3
    position_rates = np.mean([whole_word_mask(groups, len(TOKENS), 0.5, rng) for _ in range(4000)], axis=0)
    assert position_rates[0] == 0 and 0.3 < position_rates[1:-1].mean() < 0.6


def test_masks_built_side_by_side_are_the_masks_built_one_at_a_time():
    """`whole_word_masks` (RetroMAE's decoder pool, one mask per row) draws exactly what taking the words in a
    random order, one mask after another, draws from the same generator: a seeded run masks as it always did."""
    def one_at_a_time(groups, length, ratio, rng):
        target = min(512, max(1, int(round(length * ratio))))        # HF's cap on predictions
        mask, covered = np.zeros(length, dtype=np.int64), 0
        for g in rng.permutation(len(groups)):
            if covered + len(groups[g]) <= target:
                mask[groups[g]] = 1
                covered += len(groups[g])
        return mask

    groups = word_groups(TOKENS)
    for ratio in (0.15, 0.3, 0.5, 0.9):
        for seed in range(20):
            reference = np.stack([one_at_a_time(groups, len(TOKENS), ratio, rng)
                                  for rng in [np.random.default_rng(seed)] for _ in range(len(TOKENS))])
            np.testing.assert_array_equal(
                whole_word_masks(groups, len(TOKENS), ratio, np.random.default_rng(seed), count=len(TOKENS)), reference)
    long_text = [[i] for i in range(1, 1199)]                           # 1,198 one-piece words: the cap bites
    reference = np.stack([one_at_a_time(long_text, 1200, 0.5, rng) for rng in [np.random.default_rng(7)]
                          for _ in range(3)])
    masks = whole_word_masks(long_text, 1200, 0.5, np.random.default_rng(7), count=3)
    np.testing.assert_array_equal(masks, reference)
    assert (masks.sum(axis=1) == 512).all()
    assert not whole_word_masks([], 5, 0.5, np.random.default_rng(0), count=3).any()   # no words: nothing masked


def test_corruption_is_80_10_10_and_labels_only_masked_positions():
    rng = np.random.default_rng(1)
    ids = np.arange(1000, 1000 + 20000) % 30000 + 100
    mask = (np.arange(len(ids)) % 2).astype(np.int64)
    inputs, labels = corrupt(ids, mask, mask_id=4, vocab_size=30000, rng=rng)
    masked = mask == 1
    assert (labels[~masked] == IGNORE).all() and (labels[masked] == ids[masked]).all()
    assert (inputs[~masked] == ids[~masked]).all()
    share_mask = np.mean(inputs[masked] == 4)
    share_kept = np.mean(inputs[masked] == ids[masked])
    assert abs(share_mask - 0.8) < 0.02 and abs(share_kept - 0.1) < 0.02   # (a random draw rarely hits the id)


def test_every_decoder_row_hides_itself_sees_cls_and_hides_about_half():
    rng = np.random.default_rng(2)
    groups = word_groups(TOKENS)
    L = len(TOKENS)
    visible = decoder_visibility(groups, L, 0.5, rng)
    assert visible.shape == (L, L)
    assert (np.diag(visible) == 0).all()               # no row sees its own token
    assert (visible[1:, 0] == 1).all()                 # h ([CLS]) is visible to every other row
    hidden_words = (1 - visible[:, 1:-1]).sum(axis=1)
    assert (hidden_words >= round(L * 0.5) - 2).all()  # each row hides a whole-word mask of ~L/2, plus itself
    rows = {tuple(r) for r in visible}
    assert len(rows) > 1                                # rows draw different masks from the pool


def test_example_labels_and_padding():
    rng = np.random.default_rng(3)
    ids = np.arange(100, 100 + len(TOKENS))
    example = retromae_example(ids, TOKENS, mask_id=4, vocab_size=500, rng=rng)
    assert (example["decoder_input_ids"] == ids).all()                 # never [MASK]-corrupted
    labels = example["decoder_labels"]
    assert labels[0] == IGNORE and labels[-1] == IGNORE and (labels[1:-1] == ids[1:-1]).all()
    assert (example["encoder_labels"] != IGNORE).sum() == round(len(TOKENS) * 0.3)
    short = retromae_example(ids[:5], TOKENS[:4] + ["[SEP]"], mask_id=4, vocab_size=500, rng=rng)
    batch = collate_retromae([example, short], pad_id=0)
    assert batch["decoder_visibility"].shape == (2, len(TOKENS), len(TOKENS))
    assert batch["decoder_visibility"][1, :, 5:].sum() == 0           # padded columns are invisible
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(TOKENS) - 5)
    assert (batch["decoder_labels"][1, 5:] == IGNORE).all()


def test_a_batch_with_nothing_masked_has_a_zero_loss_not_nan():
    import torch

    from reprolib.modeling.autoencoder import MaskedAutoEncoder

    hidden = torch.randn(2, 5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 7)
    loss = MaskedAutoEncoder.mlm_loss(hidden, torch.full((2, 5), IGNORE), head)
    assert loss.item() == 0.0
    loss.backward()
    assert not hidden.grad.any()
    labels = torch.full((2, 5), IGNORE)
    labels[1, 2] = 3
    expected = torch.nn.functional.cross_entropy(head(hidden[1, 2:3]), torch.tensor([3]))
    torch.testing.assert_close(MaskedAutoEncoder.mlm_loss(hidden, labels, head), expected)


def test_retromae_losses_fall_on_the_synthetic_corpus(synthetic_corpus, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertForMaskedLM

    from reprolib.modeling.retromae import RetroMAEForPretraining
    from reprolib.modeling.scratch import build_scratch_model

    init = build_scratch_model(synthetic_corpus, tmp_path / "init", size="micro", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(init)
    torch.manual_seed(0)
    model = RetroMAEForPretraining(BertForMaskedLM.from_pretrained(init))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    texts = [f"{synthetic_corpus.title(i)} {synthetic_corpus.text(i)}" for i in range(256)]
    losses = []
    for step in range(120):
        batch_texts = [texts[i] for i in rng.choice(len(texts), 16, replace=False)]
        examples = []
        for text in batch_texts:
            ids = tokenizer(text, truncation=True, max_length=48)["input_ids"]
            examples.append(retromae_example(ids, tokenizer.convert_ids_to_tokens(ids), tokenizer.mask_token_id,
                                             len(tokenizer), rng))
        loss, encoder_loss, decoder_loss, _ = model(**collate_retromae(examples, tokenizer.pad_token_id))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((encoder_loss.item(), decoder_loss.item()))
    first, last = np.mean(losses[:10], axis=0), np.mean(losses[-10:], axis=0)
    assert last[0] < first[0] - 0.5 and last[1] < first[1] - 0.5, (first, last)
    saved = model.save_pretrained(tmp_path / "pretrained", tokenizer)
    from reprolib.modeling import DenseEncoder
    encoder = DenseEncoder.from_pretrained(saved)                      # the checkpoint fine-tunes directly
    assert encoder.encode_queries(["seduku oxide"]).shape == (1, encoder.dim)


def test_packing_emits_a_block_once_it_reaches_the_target_before_appending():
    from reprolib.data.pretraining import pack_blocks, passage_texts, to_sequence

    pieces = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12]]
    # max_seq_length 6 -> target 4: [1,2,3] is short, so [4,5] joins (5 >= 4: emitted before [6..9])
    assert list(pack_blocks(pieces, 6)) == [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]
    assert to_sequence([1, 2, 3, 4, 5], cls_id=101, sep_id=102, max_seq_length=6) == [101, 1, 2, 3, 4, 102]

    class Two:
        def __len__(self):
            return 2

        def title(self, i):
            return ["ab", "Seduku oxide"][i]

        def text(self, i):
            return ["short title dropped", "is grey"][i]

    assert list(passage_texts(Two())) == ["short title dropped", "Seduku oxide is grey"]


def test_encoder_loss_is_hf_masked_lm_loss_and_decoder_sees_only_its_visible_columns(synthetic_corpus, tmp_path):
    """The MLM head runs on the labelled positions only; the loss is still HF BertForMaskedLM's."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertForMaskedLM

    from reprolib.modeling.retromae import RetroMAEForPretraining
    from reprolib.modeling.scratch import build_scratch_model

    init = build_scratch_model(synthetic_corpus, tmp_path / "init", size="micro", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = RetroMAEForPretraining(BertForMaskedLM.from_pretrained(init)).eval()
    rng = np.random.default_rng(5)
    examples = []
    for i in range(4):
        ids = tokenizer(synthetic_corpus.text(i), truncation=True, max_length=32)["input_ids"]
        examples.append(retromae_example(ids, tokenizer.convert_ids_to_tokens(ids), tokenizer.mask_token_id,
                                         len(tokenizer), rng))
    batch = collate_retromae(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        _, encoder_loss, decoder_loss, _ = model(**batch)
        reference = model.lm(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["encoder_labels"]).loss
        assert encoder_loss.item() == pytest.approx(reference.item(), rel=1e-5)
        # changing a token that row i cannot see leaves row i's decoder output unchanged
        hidden = model.lm.bert(input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"])
        h = hidden.last_hidden_state[:, :1]
        emb = model.lm.bert.embeddings
        length = batch["decoder_input_ids"].shape[1]
        query = h + emb.position_embeddings.weight[:length]
        def decode(ids):
            key_value = torch.cat([h, emb(input_ids=ids)[:, 1:]], dim=1)
            return model.decoder(query, key_value, batch["decoder_visibility"])
        hidden_col = int(np.flatnonzero(batch["decoder_visibility"][0, 3].numpy() == 0)[-1])
        changed = batch["decoder_input_ids"].clone()
        changed[0, hidden_col] = (changed[0, hidden_col] + 7) % len(tokenizer)
        assert torch.allclose(decode(batch["decoder_input_ids"])[0, 3], decode(changed)[0, 3], atol=1e-6)
        # forward's decoder loss is the recipe's (built by hand above), and decode() reads the h it is given
        # (bench/retromae_bottleneck.py hands it another passage's, or zeros)
        by_hand = model.mlm_loss(decode(batch["decoder_input_ids"]), batch["decoder_labels"], model.lm.cls)
        assert decoder_loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
        args = batch["decoder_input_ids"], batch["decoder_visibility"], batch["decoder_labels"]
        assert model.decode(torch.zeros_like(h), *args).item() != pytest.approx(decoder_loss.item(), rel=1e-3)


@pytest.mark.parametrize("method", ["retromae", "lexmae"])
def test_decoder_loss_weight_zero_is_the_mlm_only_control(synthetic_dir, synthetic_corpus, tmp_path, method):
    """The control of each method's ablation runs no decoder, and that changes nothing it learns: the same
    encoder masks, and the encoder gradient of the full model's encoder MLM + 0 x decoder loss (dropout off)."""
    torch = pytest.importorskip("torch")
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig

    def objective(weight):
        config = TrainConfig(model="scratch:micro", out_dir=str(tmp_path / "run"), train_data=str(synthetic_dir),
                             objective=method, passage_max_len=32, decoder_loss_weight=weight, seed=0)
        config.check()
        return build_objective(config, synthetic_corpus)

    full, control = objective(1.0), objective(0.0)
    assert control.loss_parts == ("encoder_loss",) and full.loss_parts == ("encoder_loss", "decoder_loss")
    assert not any(name.startswith("decoder") for name, _ in control.model.named_parameters())
    control.model.lm.load_state_dict(full.model.lm.state_dict())     # the same start (a scratch model is rebuilt)
    items = [full.examples[i] for i in range(4)]
    control_items = [control.examples[i] for i in range(4)]
    for item, control_item in zip(items, control_items):             # the encoder's half, drawn identically
        assert control_item.keys() == {"encoder_input_ids", "encoder_labels"}
        for key in control_item:
            np.testing.assert_array_equal(item[key], control_item[key])

    def encoder_gradient(model, items, weight):
        model.eval()                                                  # no dropout: the two passes are comparable
        model.zero_grad()
        batch = full.examples.collate(items) if weight is not None else control.examples.collate(items)
        total, encoder_loss, decoder_loss = model(**batch)[:3]       # RetroMAE adds its NSP loss
        (encoder_loss + weight * decoder_loss if weight is not None else total).backward()
        return encoder_loss.item(), decoder_loss, [p.grad.clone() for p in model.lm.parameters() if p.grad is not None]

    full_loss, decoder_loss, full_grads = encoder_gradient(full.model, items, 0.0)
    control_loss, no_decoder, control_grads = encoder_gradient(control.model, control_items, None)
    assert decoder_loss is not None and no_decoder is None
    assert control_loss == pytest.approx(full_loss, rel=1e-6)
    loss, parts = control.loss(control.model, control_items, "cpu")             # what train() logs for the control
    assert set(parts) == {"encoder_loss"} and loss.item() == pytest.approx(parts["encoder_loss"])
    assert len(control_grads) == len(full_grads)
    for a, b in zip(control_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)
    # the full model's encoder MLM + decoder is what it trains on
    loss, parts = full.loss(full.model, items, "cpu")
    assert loss.item() == pytest.approx(parts["encoder_loss"] + parts["decoder_loss"], rel=1e-5)
    with pytest.raises(Exception, match="decoder_loss_weight must be >= 0"):
        TrainConfig(model="m", out_dir="o", train_data="d", objective="retromae", decoder_loss_weight=-1).check()


def test_next_sentence_pairs_and_loss(synthetic_dir, synthetic_corpus, tmp_path):
    """BERT's next-sentence prediction, for a "BERT" base that RetroMAE continues: [CLS] A [SEP] B [SEP] with B
    the passage's own rest (label 0) or another passage's (label 1) about half the time; the masks are drawn
    from their own stream; the loss reads the labels, trains a head on [CLS] and is logged as nsp_loss."""
    torch = pytest.importorskip("torch")
    from reprolib.data.pretraining import split_after_first_sentence
    from reprolib.objectives import build_objective
    from reprolib.training import TrainConfig

    def objective(nsp_weight, max_len=64):
        config = TrainConfig(model="scratch:micro", out_dir=str(tmp_path / "run"), train_data=str(synthetic_dir),
                             objective="retromae", passage_max_len=max_len, decoder_loss_weight=0.0,
                             nsp_loss_weight=nsp_weight, seed=0)
        config.check()
        return build_objective(config, synthetic_corpus)

    bert, plain = objective(1.0), objective(0.0)
    assert bert.loss_parts == ("encoder_loss", "nsp_loss") and plain.loss_parts == ("encoder_loss",)
    tokenizer, examples = bert.tokenizer, bert.examples
    sep = tokenizer.sep_token_id
    labels, sentences = [], 0
    for i in range(200):
        item, whole = examples[i], examples.sequences[i]
        ids = np.where(item["encoder_labels"] != IGNORE, item["encoder_labels"], item["encoder_input_ids"])
        seps = np.flatnonzero(ids == sep)
        assert len(seps) == 2 and seps[1] == len(ids) - 1, tokenizer.decode(ids)
        a, b = ids[1:seps[0]], ids[seps[0] + 1:-1]
        body = whole[1:-1]
        tokens = tokenizer.convert_ids_to_tokens(body.tolist())
        assert len(a) == split_after_first_sentence(tokens) and (a == body[:len(a)]).all()
        if "." in tokens[:-1]:
            assert tokens[len(a) - 1] == "."                           # A is the first sentence
        sentences += "." in tokens[:-1]
        assert item["token_type_ids"].tolist() == [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0] - 1)
        own_rest = whole[1 + len(a):-1]
        assert (len(b) == len(own_rest) and (b == own_rest).all()) == (item["next_sentence_label"] == 0)
        labels.append(item["next_sentence_label"])
    assert 0.35 < np.mean(labels) < 0.65 and sentences > 100
    short = objective(1.0, max_len=12).examples                         # cut passages: A and B still both fit
    for i in range(100):
        item = short[i]
        ids = np.where(item["encoder_labels"] != IGNORE, item["encoder_labels"], item["encoder_input_ids"])
        seps = np.flatnonzero(ids == sep)
        assert len(ids) <= 12 and len(seps) == 2 and 1 < seps[0] < len(ids) - 2, tokenizer.decode(ids)

    batch = examples.collate([examples[i] for i in range(8)])
    assert batch["token_type_ids"].shape == batch["encoder_input_ids"].shape
    model = bert.model.eval()
    total, encoder_loss, decoder_loss, nsp_loss = model(**batch)
    assert decoder_loss is None and total.item() == pytest.approx(encoder_loss.item() + nsp_loss.item(), rel=1e-5)
    flipped = dict(batch, next_sentence_label=1 - batch["next_sentence_label"])
    assert model(**flipped)[3].item() != pytest.approx(nsp_loss.item(), rel=1e-4)       # it reads the labels
    unlabelled = dict(batch, next_sentence_label=torch.full_like(batch["next_sentence_label"], IGNORE))
    assert model(**unlabelled)[3].item() == 0                     # no one-word passage's label counts (no NaN)
    nsp_loss.backward()
    assert model.lm.bert.pooler.dense.weight.grad.abs().sum() > 0
    assert model.lm.bert.embeddings.token_type_embeddings.weight.grad[1].abs().sum() > 0   # B's segment trains
    loss, parts = bert.loss(model, [examples[i] for i in range(8)], "cpu")
    assert set(parts) == {"encoder_loss", "nsp_loss"}
    # saved with BERT's next-sentence head: a continuation keeps it, a cross-encoder starts from its pooler
    bert.save(model, tmp_path / "saved")
    from reprolib.modeling import CrossEncoder
    from reprolib.modeling.autoencoder import load_masked_lm
    pooler = model.lm.bert.pooler.dense.weight
    again = load_masked_lm(tmp_path / "saved", next_sentence=True)
    assert torch.equal(again.bert.pooler.dense.weight, pooler)
    assert torch.equal(again.cls.seq_relationship.weight, model.lm.cls.seq_relationship.weight)
    assert torch.equal(CrossEncoder.from_pretrained(tmp_path / "saved").model.bert.pooler.dense.weight, pooler)
    assert not hasattr(load_masked_lm(tmp_path / "saved").cls, "seq_relationship")    # RetroMAE continues it so
    for wrong in ({"objective": "lexmae"}, {"decoder_loss_weight": 1.0}, {"pack": True}):
        with pytest.raises(Exception, match="nsp_loss_weight"):
            TrainConfig(**{"model": "m", "out_dir": "o", "train_data": "d", "objective": "retromae",
                           "decoder_loss_weight": 0.0, "nsp_loss_weight": 1.0, **wrong}).check()
