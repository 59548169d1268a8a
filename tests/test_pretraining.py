"""Pretraining through the one training loop: corpus -> packed sequences -> masked examples -> RetroMAE /
LexMAE steps -> a BertForMaskedLM checkpoint that the dense and sparse encoders fine-tune directly."""
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from reprolib.data.pretraining import PretrainingExamples, build_sequences  # noqa: E402
from reprolib.errors import ReprolibError  # noqa: E402
from reprolib.training import TrainConfig, read_log, train  # noqa: E402


@pytest.fixture(scope="module")
def micro_tokenizer(synthetic_corpus, tmp_path_factory):
    from transformers import AutoTokenizer

    from reprolib.modeling.scratch import build_scratch_model

    path = build_scratch_model(synthetic_corpus, tmp_path_factory.mktemp("micro"), size="micro")
    return AutoTokenizer.from_pretrained(str(path))


def test_retromae_makes_one_sequence_per_passage_by_default(synthetic_corpus, micro_tokenizer):
    """RetroMAE on MS MARCO (docs/recipes.md errata 3): a passage is a sequence, cut at max_seq_length."""
    sequences = build_sequences(synthetic_corpus, micro_tokenizer, "retromae", max_seq_length=16)
    assert len(sequences) == len(synthetic_corpus)
    text = synthetic_corpus.title(3) + " " + synthetic_corpus.text(3)
    ids = micro_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sequences[3].tolist() == [micro_tokenizer.cls_token_id, *ids[:14], micro_tokenizer.sep_token_id]


def test_retromae_packed_sequences_are_blocks_with_specials(synthetic_corpus, micro_tokenizer):
    sequences = build_sequences(synthetic_corpus, micro_tokenizer, "retromae", max_seq_length=64, pack=True)
    cls, sep = micro_tokenizer.cls_token_id, micro_tokenizer.sep_token_id
    assert all(s[0] == cls and s[-1] == sep and len(s) <= 64 for s in sequences)
    assert all(len(s) == 64 for s in sequences[:-1])        # passages are short: every block fills up
    pieces = sum(len(micro_tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in (synthetic_corpus.title(i) + " " + synthetic_corpus.text(i) for i in range(40)))
    assert len(sequences) < len(synthetic_corpus) / 2 and pieces > 0


def test_lexmae_sequences_are_title_sep_passage_cut_at_the_end(synthetic_corpus, micro_tokenizer):
    """docs/recipes.md correction 7: one segment `title[SEP]passage`, truncated at the end (the title survives)."""
    sequences = build_sequences(synthetic_corpus, micro_tokenizer, "lexmae", max_seq_length=24)
    assert len(sequences) == len(synthetic_corpus)
    title = micro_tokenizer(synthetic_corpus.title(0), add_special_tokens=False)["input_ids"]
    text = micro_tokenizer(synthetic_corpus.text(0), add_special_tokens=False)["input_ids"]
    cls, sep = micro_tokenizer.cls_token_id, micro_tokenizer.sep_token_id
    assert sequences[0].tolist() == ([cls, *title, sep, *text][:23] + [sep])
    assert all(np.sum(s == sep) == 2 for s in sequences)                        # [CLS] title [SEP] text [SEP]


@pytest.mark.parametrize("method", ["retromae", "lexmae"])
def test_sequences_are_tokenized_when_asked_for_so_a_huge_corpus_costs_nothing_up_front(synthetic_corpus,
                                                                                       micro_tokenizer, method):
    """Issue 17: MS MARCO's 8.8M passages took ~16 min and GBs to tokenize before the first step. Now building
    the sequences of a 100M-passage corpus tokenizes nothing, and each sequence equals the batch tokenizer's."""
    class Huge:                                              # passage i is the synthetic corpus's i mod 1000
        def __len__(self):
            return 100_000_000

        def title(self, i):
            return synthetic_corpus.title(i % 1000)

        def text(self, i):
            return synthetic_corpus.text(i % 1000)

    calls = []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __call__(self, texts, **kwargs):
            calls.append(1 if isinstance(texts, str) else len(texts))
            return self.tokenizer(texts, **kwargs)

    sequences = build_sequences(Huge(), Counting(micro_tokenizer), method, max_seq_length=20)
    assert len(sequences) == 100_000_000 and calls == []
    template = "retromae_pretrain" if method == "retromae" else "lexmae"
    from reprolib.data.pretraining import passage_texts
    texts = list(passage_texts(synthetic_corpus, template, limit=30, sep=micro_tokenizer.sep_token))
    expected = micro_tokenizer(texts, truncation=True, max_length=20)["input_ids"]   # the tokenizer's own cut
    for i in range(30):
        assert sequences[99_000_000 + i].tolist() == expected[i]
    assert sum(calls) == 30 and sequences[-1].tolist() == sequences[99_999_999].tolist()
    with pytest.raises(IndexError):
        sequences[100_000_000]


@pytest.mark.parametrize("method", ["retromae", "lexmae"])
def test_masks_depend_on_seed_epoch_and_index_only(synthetic_corpus, micro_tokenizer, method):
    sequences = build_sequences(synthetic_corpus, micro_tokenizer, method, max_seq_length=48)
    a = PretrainingExamples(sequences, micro_tokenizer, method, seed=3)
    b = PretrainingExamples(sequences, micro_tokenizer, method, seed=3)
    b[5], b[2]                                                              # draws elsewhere change nothing
    assert np.array_equal(a[2]["encoder_input_ids"], b[2]["encoder_input_ids"])
    a.set_epoch(1)
    assert not np.array_equal(a[2]["encoder_input_ids"], b[2]["encoder_input_ids"])
    batch = a.collate([a[i] for i in range(4)])
    assert batch["encoder_input_ids"].shape[0] == 4 and batch["attention_mask"].sum() == sum(len(sequences[i]) for i in range(4))


@pytest.mark.parametrize("method", ["retromae", "lexmae"])
def test_pretraining_runs_logs_both_losses_and_saves_a_checkpoint_the_encoders_load(synthetic_dir, tmp_path, method):
    from reprolib.modeling import DenseEncoder

    config = TrainConfig(model="scratch:micro", out_dir=str(tmp_path / method), train_data=str(synthetic_dir),
                         objective=method, passage_max_len=48, batch_size=8, max_steps=4, learning_rate=1e-3,
                         gradient_checkpointing=True, progress=False, tensorboard=False)
    summary = train(config, log=lambda *_: None)
    assert summary["objective"] == method and summary["steps"] == 4 and summary["examples"] > 0
    rows = read_log(tmp_path / method / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["loss"] == pytest.approx(row["encoder_loss"] + row["decoder_loss"], rel=1e-5)
    saved = tmp_path / method / "model"
    from transformers import BertForMaskedLM
    assert isinstance(BertForMaskedLM.from_pretrained(str(saved)), BertForMaskedLM)
    encoder = DenseEncoder.from_pretrained(saved)
    assert encoder.encode_queries(["a query"]).shape == (1, encoder.dim)


def test_bad_pretraining_options_are_one_line_errors(synthetic_dir, tmp_path):
    with pytest.raises(ReprolibError, match="objective must be one of"):
        TrainConfig.from_dict({"model": "m", "out_dir": str(tmp_path), "train_data": "d", "objective": "mae"})
    with pytest.raises(ReprolibError, match="encoder_mask_ratio must be between 0 and 1"):
        TrainConfig.from_dict({"model": "m", "out_dir": str(tmp_path), "train_data": "d", "objective": "retromae",
                               "encoder_mask_ratio": 1.5})


@pytest.mark.parametrize("method", ["retromae", "lexmae"])
def test_masked_token_accuracy_counts_every_masked_token_of_every_example(synthetic_corpus, micro_tokenizer, method,
                                                                         tmp_path):
    """Against HF's full-sequence logits, and a head that always says one token: the share of masked labels
    that are that token, pooled over all examples (not averaged per sequence)."""
    from transformers import BertForMaskedLM

    from reprolib.modeling.autoencoder import masked_token_accuracy
    from reprolib.modeling.scratch import build_scratch_model

    lm = BertForMaskedLM.from_pretrained(str(build_scratch_model(synthetic_corpus, tmp_path, size="micro"))).eval()
    examples = PretrainingExamples(build_sequences(synthetic_corpus, micro_tokenizer, method, max_seq_length=40,
                                                   limit=50), micro_tokenizer, method, seed=1)
    items = [examples[i] for i in range(len(examples))]
    hits = total = 0
    with torch.no_grad():
        for e in items:
            predicted = lm(input_ids=torch.as_tensor(e["encoder_input_ids"])[None]).logits[0].argmax(-1).numpy()
            masked = e["encoder_labels"] != -100
            hits += int((predicted[masked] == e["encoder_labels"][masked]).sum())
            total += int(masked.sum())
    assert masked_token_accuracy(lm, examples, batch_size=7) == pytest.approx(hits / total)

    labels = np.concatenate([e["encoder_labels"][e["encoder_labels"] != -100] for e in items])
    common = int(np.bincount(labels).argmax())

    class Constant(torch.nn.Module):
        def forward(self, hidden):
            logits = torch.zeros(len(hidden), len(micro_tokenizer))
            logits[:, common] = 1.0
            return logits

    lm.cls = Constant()
    assert masked_token_accuracy(lm, examples) == pytest.approx(np.mean(labels == common))
    assert 0 < np.mean(labels == common) < 1
