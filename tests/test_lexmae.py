"""LexMAE pretraining: exact-count encoder masks, the wider decoder mask, BERT corruption, the lexicon
bottleneck (pooling, normalisation, no gradient into the embeddings), the tied decoder output, the saved
checkpoint, and losses that fall on the synthetic corpus with a micro BERT built from it."""
import math

import numpy as np
import pytest

from reprolib.data.masking import IGNORE, collate_lexmae, exact_token_mask, lexmae_example

MASK_ID, VOCAB = 4, 500


def pair_special_mask(title_len, text_len):
    """[CLS] title [SEP] text [SEP]: three specials."""
    return np.array([1] + [0] * title_len + [1] + [0] * text_len + [1])


def test_exact_token_mask_takes_ceil_of_the_text_and_never_a_special():
    rng = np.random.default_rng(0)
    for n in range(0, 140):
        special = pair_special_mask(n // 4, n - n // 4)
        for _ in range(5):
            mask = exact_token_mask(special, 0.3, rng)
            assert mask.sum() == math.ceil(n * 0.3)
            assert (mask[special == 1] == 0).all()
    rates = np.mean([exact_token_mask(pair_special_mask(3, 7), 0.3, rng) for _ in range(4000)], axis=0)
    text = pair_special_mask(3, 7) == 0
    assert np.allclose(rates[text], rates[text].mean(), atol=0.05)       # every text position alike


def _examples(count, rng, title_len=5, text_len=35):
    special = pair_special_mask(title_len, text_len)
    ids = np.where(special == 1, 3, rng.integers(10, VOCAB, size=len(special)))
    return ids, special, [lexmae_example(ids, special, MASK_ID, VOCAB, rng) for _ in range(count)]


def test_decoder_mask_contains_the_encoder_mask_and_covers_about_half():
    ids, special, examples = _examples(3000, np.random.default_rng(1))
    n = int((special == 0).sum())
    decoder_shares = []
    for e in examples:
        encoder_masked, decoder_masked = e["encoder_labels"] != IGNORE, e["decoder_labels"] != IGNORE
        assert encoder_masked.sum() == math.ceil(n * 0.3)
        assert (decoder_masked[encoder_masked]).all()                        # decoder mask ⊇ encoder mask
        assert not decoder_masked[special == 1].any()
        decoder_shares.append(decoder_masked.sum() / n)
    assert abs(np.mean(decoder_shares) - 0.5) < 0.01


def test_corruption_is_80_10_10_with_labels_only_at_masked_positions():
    ids, special, examples = _examples(3000, np.random.default_rng(2))
    for side in ("encoder", "decoder"):
        inputs = np.stack([e[f"{side}_input_ids"] for e in examples])
        labels = np.stack([e[f"{side}_labels"] for e in examples])
        masked = labels != IGNORE
        assert (labels[masked] == np.broadcast_to(ids, labels.shape)[masked]).all()
        assert (inputs[~masked] == np.broadcast_to(ids, inputs.shape)[~masked]).all()
        original = np.broadcast_to(ids, inputs.shape)[masked]
        share_mask, share_kept = np.mean(inputs[masked] == MASK_ID), np.mean(inputs[masked] == original)
        assert abs(share_mask - 0.8) < 0.02 and abs(share_kept - 0.1) < 0.02, side


def test_decoder_corruption_is_drawn_afresh():
    _, _, examples = _examples(500, np.random.default_rng(3))
    # on positions both sides mask, the decoder's 80/10/10 draw is independent of the encoder's
    both = [(e["encoder_input_ids"] == MASK_ID)[e["encoder_labels"] != IGNORE]
            != (e["decoder_input_ids"] == MASK_ID)[e["encoder_labels"] != IGNORE] for e in examples]
    assert 0.2 < np.mean(np.concatenate(both)) < 0.4                     # 2 * 0.8 * 0.2 = 0.32


def test_collate_pads_and_text_mask_drops_specials_and_padding():
    rng = np.random.default_rng(4)
    long = lexmae_example(np.arange(100, 110), pair_special_mask(3, 4), MASK_ID, VOCAB, rng)
    short = lexmae_example(np.arange(100, 106), pair_special_mask(1, 2), MASK_ID, VOCAB, rng)
    batch = collate_lexmae([long, short], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 6 + [0] * 4]
    assert batch["text_mask"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0, 0, 0, 0, 0]]
    assert (batch["decoder_input_ids"][1, 6:] == 0).all() and (batch["encoder_labels"][1, 6:] == IGNORE).all()
    assert (batch["decoder_labels"][1, 6:] == IGNORE).all()


@pytest.fixture(scope="module")
def micro_bert(synthetic_corpus, tmp_path_factory):
    pytest.importorskip("torch")
    from reprolib.modeling.scratch import build_scratch_model

    return build_scratch_model(synthetic_corpus, tmp_path_factory.mktemp("lexmae") / "init", size="micro", seed=0)


@pytest.fixture
def one_thread():
    """A micro model gains nothing from a second thread, and loses much to it when the cores are busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(micro_bert, **kwargs):
    import torch

    from reprolib.modeling.lexmae import LexMAEForPretraining

    torch.manual_seed(0)
    return LexMAEForPretraining.from_pretrained(micro_bert, **kwargs)


@pytest.mark.parametrize("kind", ["softmax", "logits_sat"])
def test_bottleneck_is_a_distribution_pooled_over_text_only(micro_bert, kind):
    import torch

    model = _model(micro_bert, bottleneck=kind)
    hidden = torch.randn(2, 6, model.lm.config.hidden_size)
    text_mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]])      # [CLS] .. [SEP] .. [SEP] / padding
    logits = model.lm.cls(hidden)
    v = model.pooled_logits(hidden, text_mask)
    reference = logits.masked_fill(text_mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
    assert torch.allclose(v, reference, atol=1e-5)
    a, b = model.bottleneck(v)
    assert a.shape == (2, model.lm.config.vocab_size) and b.shape == (2, model.lm.config.hidden_size)
    assert torch.allclose(a.sum(-1), torch.ones(2), atol=1e-3)             # logits_sat: L1 norm, +1e-4 slack
    if kind == "softmax":
        assert torch.allclose(a[1], logits[1, 1].softmax(-1), atol=1e-6)  # one text token: its own logits
    changed = hidden.clone()
    changed[:, [0, 3, 5]] += 5                                            # specials and padding
    assert torch.equal(model.pooled_logits(changed, text_mask), v)
    changed[0, 2] += 5                                                    # a text position
    assert not torch.equal(model.pooled_logits(changed, text_mask)[0], v[0])


def test_bottleneck_sends_no_gradient_into_the_word_embeddings(micro_bert):
    import torch

    model = _model(micro_bert)
    v = torch.randn(2, model.lm.config.vocab_size, requires_grad=True)
    _, b = model.bottleneck(v)
    embeddings = model.lm.get_input_embeddings().weight
    (grad_embeddings, grad_v) = torch.autograd.grad(b.sum(), [embeddings, v], allow_unused=True)
    assert grad_embeddings is None                                       # the path through E is cut ...
    assert grad_v is not None and grad_v.abs().sum() > 0                 # ... the path through a is not


def test_bottleneck_layer_norm_puts_b_on_the_scale_of_the_decoders_other_inputs(micro_bert):
    """A fresh model's word embeddings average to almost 0, so b is far smaller than an embedded token; through the
    embeddings' LayerNorm it has the tokens' scale, and the decoder's loss depends on it more."""
    import torch

    plain, normed = _model(micro_bert), _model(micro_bert, bottleneck_layer_norm=True)
    v = torch.randn(2, plain.lm.config.vocab_size)
    token = plain.lm.bert.embeddings(input_ids=torch.tensor([[5, 6]]))[0, 1].norm()
    _, b = plain.bottleneck(v)
    _, b_normed = normed.bottleneck(v)
    assert b.norm(dim=-1).max() < 0.05 * token
    assert torch.allclose(b_normed, plain.lm.bert.embeddings.LayerNorm(b))
    assert (b_normed.norm(dim=-1) - token).abs().max() < 0.5 * token
    _, _, examples = _examples(4, np.random.default_rng(5), title_len=3, text_len=10)
    batch = collate_lexmae(examples, pad_id=0)
    with torch.no_grad():
        losses = {}
        for name, model in (("plain", plain), ("normed", normed)):
            model.eval()
            own = model(**batch)[2]
            model.bottleneck = lambda v, model=model, f=model.bottleneck: (lambda a, b: (a, torch.zeros_like(b)))(*f(v))
            losses[name] = abs(model(**batch)[2] - own).item()            # what taking b away changes
    assert losses["normed"] > 10 * losses["plain"]
    normed = _model(micro_bert, bottleneck_layer_norm=True)
    with torch.no_grad():                                               # the embeddings' own LayerNorm, not a new one
        normed.lm.bert.embeddings.LayerNorm.weight.mul_(2)
    assert torch.allclose(normed.bottleneck(v)[1], 2 * b_normed, atol=1e-6)


def test_a_new_head_starts_random_or_as_the_sparse_encoders_identity(micro_bert):
    import torch

    from reprolib.modeling.autoencoder import load_masked_lm

    identity, random = (load_masked_lm(micro_bert, start).cls.predictions for start in ("identity", "random"))
    width = identity.transform.dense.weight.shape[0]
    assert torch.equal(identity.transform.dense.weight, torch.eye(width))
    assert not torch.equal(random.transform.dense.weight, torch.eye(width))
    embeddings = load_masked_lm(micro_bert, "identity")
    assert embeddings.get_output_embeddings().weight is embeddings.get_input_embeddings().weight


def test_decoder_loss_reaches_the_encoder_through_the_bottleneck(micro_bert):
    import torch

    model = _model(micro_bert)
    _, _, examples = _examples(4, np.random.default_rng(5), title_len=3, text_len=10)
    _, _, decoder_loss = model(**collate_lexmae(examples, pad_id=0))
    top_layer = model.lm.bert.encoder.layer[-1].output.dense.weight      # used by the encoder alone
    (grad,) = torch.autograd.grad(decoder_loss, [top_layer])
    assert grad.abs().sum() > 0


def test_decoder_output_is_the_word_embeddings_with_its_own_zero_bias_and_new_layers_are_bert_initialised(micro_bert):
    model = _model(micro_bert, decoder_layers=3)
    assert model.decoder_bias.abs().max() == 0 and model.decoder_bias is not model.lm.cls.predictions.bias
    assert model.decoder_transform is not model.lm.cls.predictions.transform
    assert len(model.decoder) == 3
    query = model.decoder[0].attention.self.query
    assert abs(query.weight.std().item() - model.lm.config.initializer_range) < 0.005
    assert query.bias.abs().max() == 0


def test_lexmae_losses_fall_and_the_checkpoint_reloads(synthetic_corpus, micro_bert, tmp_path, one_thread):
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(micro_bert)
    model = _model(micro_bert)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    pairs = [(synthetic_corpus.title(i), synthetic_corpus.text(i)) for i in range(256)]
    special_ids = [tokenizer.cls_token_id, tokenizer.sep_token_id]
    losses = []
    for step in range(120):
        examples = []
        for i in rng.choice(len(pairs), 16, replace=False):
            ids = tokenizer(*pairs[i], truncation="longest_first", max_length=48)["input_ids"]
            special = np.isin(ids, special_ids).astype(np.int64)
            assert special.sum() == 3
            examples.append(lexmae_example(ids, special, tokenizer.mask_token_id, len(tokenizer), rng))
        loss, encoder_loss, decoder_loss = model(**collate_lexmae(examples, tokenizer.pad_token_id))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((encoder_loss.item(), decoder_loss.item()))
    first, last = np.mean(losses[:10], axis=0), np.mean(losses[-10:], axis=0)
    assert last[0] < first[0] - 0.5 and last[1] < first[1] - 0.5, (first, last)
    assert model.decoder_bias.abs().max() > 0                         # trained, apart from the encoder's bias
    saved = model.save_pretrained(tmp_path / "pretrained", tokenizer)
    reloaded = BertForMaskedLM.from_pretrained(saved)
    assert torch.equal(reloaded.get_input_embeddings().weight, model.lm.get_input_embeddings().weight)
    assert torch.equal(reloaded.cls.predictions.transform.dense.weight, model.lm.cls.predictions.transform.dense.weight)
    assert not any("decoder." in name and "predictions" not in name for name in reloaded.state_dict())


@pytest.mark.parametrize("rate", [0.0, 1e-5])
def test_encoder_learning_rate_moves_the_body_slower_than_the_head_and_at_zero_freezes_it(
        synthetic_dir, micro_bert, tmp_path, one_thread, rate):
    """`encoder_learning_rate` (TrainConfig): the checkpoint's body, the tied output projection with it, learns at
    its own rate while the new MLM head's transform and the decoder learn at learning_rate; at 0 the body is frozen."""
    from reprolib.modeling.autoencoder import load_masked_lm
    from reprolib.training import TrainConfig, _optimizer, train

    config = TrainConfig(model=str(micro_bert), out_dir=str(tmp_path / "run"), train_data=str(synthetic_dir),
                         objective="lexmae", new_head="identity", batch_size=8, max_steps=3, learning_rate=1e-3,
                         encoder_learning_rate=rate, passage_max_len=48, progress=False, tensorboard=False)
    train(config, log=lambda *_: None)
    before = load_masked_lm(micro_bert, "identity").state_dict()   # the identity head: the start, exactly
    after = load_masked_lm(tmp_path / "run" / "model").state_dict()

    def moved(prefix):
        return max(float((after[k] - before[k]).abs().max()) for k in before if k.startswith(prefix))

    # Adam moves a weight by about lr a step at most: 3 steps of a linear decay, under 6.3e-5 at 1e-5
    assert moved("cls.predictions.transform.") > 5e-4
    assert moved("bert.") == 0 if rate == 0 else 0 < moved("bert.") < 1e-4   # the word embeddings, tied, too

    # the groups themselves: each of the model's trainable parameters once, at its part's rate
    model = _model(micro_bert)
    optimizer = _optimizer(model, config)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(rates) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)
    assert rates.get(id(model.lm.bert.embeddings.word_embeddings.weight), rate) == rate
    assert rates[id(model.decoder_bias)] == rates[id(model.lm.cls.predictions.transform.dense.weight)] == 1e-3
    assert (rate == 0) == (not model.lm.bert.encoder.layer[0].attention.self.query.weight.requires_grad)


def test_without_encoder_learning_rate_every_weight_has_the_one_rate(micro_bert):
    from reprolib.errors import ReprolibError
    from reprolib.training import TrainConfig, _optimizer

    config = TrainConfig(model=str(micro_bert), out_dir="unused", train_data="unused", learning_rate=1e-3,
                         weight_decay=0.01)
    model = _model(micro_bert)
    groups = _optimizer(model, config).param_groups
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0)]   # decayed, then not
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    body_only = TrainConfig(**{**vars(config), "encoder_learning_rate": 1e-5})
    with pytest.raises(ReprolibError, match="no head, projection or decoder outside"):
        _optimizer(model.lm.bert, body_only)                          # a BertModel is all body
    with pytest.raises(ReprolibError, match="encoder_learning_rate must be >= 0"):
        TrainConfig.from_dict({"model": "m", "out_dir": "o", "train_data": "d", "encoder_learning_rate": -1e-5})
