"""Model specs (package:, scratch:), the scratch BERT builder, and linking a local dataset as a data stage."""
import json

import pytest

from reprolib.data.prepare import prepare
from reprolib.errors import ReprolibError
from reprolib.modeling.specs import package_path


def test_package_spec_resolves_inside_an_installed_package():
    import reprolib

    assert package_path("package:reprolib/data") == str(__import__("pathlib").Path(reprolib.__file__).parent / "data")
    assert package_path("bert-base-uncased") == "bert-base-uncased"     # anything else passes through
    with pytest.raises(ReprolibError, match="'no_such_package_xyz' is not installed"):
        package_path("package:no_such_package_xyz/model")
    with pytest.raises(ReprolibError, match="does not exist"):
        package_path("package:reprolib/no_such_folder")


def test_scratch_bert_is_deterministic_and_knows_the_corpus_words(synthetic_corpus, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from reprolib.modeling.scratch import build_scratch_model

    a = build_scratch_model(synthetic_corpus, tmp_path / "a", size="micro", seed=3)
    b = build_scratch_model(synthetic_corpus, tmp_path / "b", size="micro", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    vocab_a = json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab_a == json.loads((b / "tokenizer.json").read_text())["model"]["vocab"]
    tokenizer = AutoTokenizer.from_pretrained(a)
    title = synthetic_corpus.title(0).lower()
    pieces = tokenizer.tokenize(title)
    assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == title.replace(" ", "")
    assert tokenizer("the")["input_ids"][1] not in (tokenizer.unk_token_id, None)   # frequent words are whole tokens
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    build_scratch_model(synthetic_corpus, a, size="micro", seed=3)                  # same recipe: reused
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    marker = a / "scratch.json"
    marker.write_text(marker.read_text()[:10])   # a marker cut short (a crash as it was written): built again
    build_scratch_model(synthetic_corpus, a, size="micro", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads(marker.read_text())["seed"] == 3


def test_pieces_vocabulary_splits_rare_words_into_pieces_seen_often(synthetic_corpus):
    """"tiny-pieces" keeps a word whole only when the corpus has it 100 times; a rarer name is split into pieces
    that other words share, so that MLM pretraining sees them far more often than the names."""
    pytest.importorskip("transformers")
    from collections import Counter

    from reprolib.modeling.scratch import SIZES, SPECIAL_TOKENS, _split_word, _word_piece_vocab, bert_tokenizer

    texts = [f"{synthetic_corpus.title(i)} {synthetic_corpus.text(i)}" for i in range(len(synthetic_corpus))]
    size = SIZES["tiny-pieces"]
    vocab = _word_piece_vocab(texts, size.vocab, size.min_word_count)
    assert vocab == _word_piece_vocab(texts, size.vocab, size.min_word_count)          # deterministic
    assert len(vocab) == len(set(vocab)) <= size.vocab
    tokenizer = bert_tokenizer(vocab)
    backend = tokenizer.backend_tokenizer
    words = Counter(w for text in texts for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)))
    rare = [w for w, n in words.items() if n < size.min_word_count and len(w) > 1]
    common = [w for w, n in words.items() if n >= size.min_word_count and len(w) > 1]
    assert rare and common
    assert all(tokenizer.tokenize(w) == [w] for w in common)                            # frequent words whole
    splits = {w: tokenizer.tokenize(w) for w in rare}
    assert all(splits[w] == _split_word(w, set(vocab)) for w in rare)                  # BERT's own split
    assert sum(split != [w] for w, split in splits.items()) > 0.9 * len(rare)          # whole only if also a piece
    # pieces, not characters: a split rare word takes a few pieces, and every piece offered is one a split uses
    assert sum(len(split) for split in splits.values()) < 3 * len(rare)
    chars = set(SPECIAL_TOKENS) | {t for t in vocab if len(t.removeprefix("##")) == 1}
    used = {piece for split in splits.values() for piece in split}
    assert all(t in used or t in common for t in vocab if t not in chars)


def test_whole_word_vocabulary_keeps_the_most_frequent_words():
    """"tiny" (min_word_count 1): every word may be whole, the most frequent first, ties by spelling."""
    from reprolib.modeling.scratch import SPECIAL_TOKENS, _word_piece_vocab

    texts = ["apple apple apple pear pear fig", "apple kiwi kiwi fig plum"]
    base = len(SPECIAL_TOKENS) + 2 * len(set("applepearfigkiwiplum"))
    assert _word_piece_vocab(texts, base + 3)[base:] == ["apple", "fig", "kiwi"]
    assert _word_piece_vocab(texts, base + 3, min_word_count=3)[base:base + 1] == ["apple"]   # only apple is common


def test_scratch_t5_encodes_with_openmatchs_first_decoder_token(synthetic_corpus, tmp_path):
    pytest.importorskip("transformers")
    from reprolib.modeling import DenseEncoder
    from reprolib.modeling.scratch import build_scratch_model

    path = build_scratch_model(synthetic_corpus, tmp_path / "t5", size="t5-tiny", seed=0)
    encoder = DenseEncoder.from_pretrained(path)
    assert encoder.t5_mode == "decoder" and type(encoder.encoder).__name__ == "T5Model"
    vectors = encoder.encode_passages([synthetic_corpus.text(0), synthetic_corpus.text(1)])
    assert vectors.shape == (2, 128) and abs(vectors[0] - vectors[1]).max() > 0


def test_t5_scaled_spec_keeps_the_vectors_and_shrinks_the_weights(synthetic_corpus, tmp_path):
    """OpenMatch's t5-base-scaled (docs/recipes.md correction 5): the same function, smaller weights."""
    pytest.importorskip("transformers")
    import numpy as np
    from transformers import T5Model

    from reprolib.modeling import DenseEncoder
    from reprolib.modeling.scratch import build_scratch_model
    from reprolib.modeling.specs import resolve_model

    other = build_scratch_model(synthetic_corpus, tmp_path / "other", size="t5-tiny", seed=1)
    resolve_model(f"t5-scaled:{other}", synthetic_corpus, tmp_path / "scaled")   # a stale build in the same folder
    plain = build_scratch_model(synthetic_corpus, tmp_path / "t5", size="t5-tiny", seed=0)
    scaled = resolve_model(f"t5-scaled:{plain}", synthetic_corpus, tmp_path / "scaled")
    texts = [synthetic_corpus.text(i) for i in range(4)]
    a = DenseEncoder.from_pretrained(scaled).encode_passages(texts)
    b = DenseEncoder.from_pretrained(plain).encode_passages(texts)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.9999    # equal up to RMSNorm's epsilon, which the 100x smaller stream feels
    before, after = T5Model.from_pretrained(plain), T5Model.from_pretrained(scaled)
    ratio = lambda get: float(get(before).weight.detach().norm() / get(after).weight.detach().norm())  # noqa: E731
    assert ratio(lambda m: m.shared) == pytest.approx(100, rel=1e-4)
    assert ratio(lambda m: m.encoder.block[0].layer[0].SelfAttention.o) == pytest.approx(100, rel=1e-4)
    assert ratio(lambda m: m.decoder.block[0].layer[1].EncDecAttention.o) == pytest.approx(100, rel=1e-4)
    assert ratio(lambda m: m.decoder.block[0].layer[2].DenseReluDense.wi) == pytest.approx(10, rel=1e-4)
    assert ratio(lambda m: m.encoder.block[0].layer[0].SelfAttention.q) == pytest.approx(1, rel=1e-6)


def test_a_t5_trained_again_at_the_same_path_is_scaled_again(synthetic_corpus, tmp_path):
    """The scaled build is of the source's files, not its path: notebook 20 retraining the T5 at the same path must
    not leave its old weights, scaled, under the new name."""
    import torch
    from transformers import T5Model

    from reprolib.modeling.scratch import build_scratch_model
    from reprolib.modeling.specs import resolve_model

    source = tmp_path / "t5"
    build_scratch_model(synthetic_corpus, source, size="t5-tiny", seed=0)
    resolve_model(f"t5-scaled:{source}", synthetic_corpus, tmp_path / "scaled")
    build_scratch_model(synthetic_corpus, source, size="t5-tiny", seed=1)   # trained again, as it were
    scaled = resolve_model(f"t5-scaled:{source}", synthetic_corpus, tmp_path / "scaled")
    assert torch.allclose(T5Model.from_pretrained(scaled).shared.weight * 100,
                          T5Model.from_pretrained(source).shared.weight)


def test_an_init_folder_holds_the_last_build_only(synthetic_corpus, tmp_path):
    """A training's init folder built from "scratch:t5-tiny", then "t5-scaled:...", then "scratch:t5-tiny" again:
    the third must be the scratch model, not the scaled weights left under the first build's marker."""
    import torch
    from transformers import T5Model

    from reprolib.modeling.scratch import build_scratch_model
    from reprolib.modeling.specs import resolve_model

    plain = build_scratch_model(synthetic_corpus, tmp_path / "t5", size="t5-tiny", seed=0)
    init = tmp_path / "init"
    resolve_model("scratch:t5-tiny", synthetic_corpus, init, seed=0)
    resolve_model(f"t5-scaled:{plain}", synthetic_corpus, init)
    again = resolve_model("scratch:t5-tiny", synthetic_corpus, init, seed=0)
    assert torch.equal(T5Model.from_pretrained(again).shared.weight, T5Model.from_pretrained(plain).shared.weight)


def test_prepare_links_a_local_dataset_directory(tmp_path):
    source = tmp_path / "beir"
    (source / "qrels").mkdir(parents=True)
    (source / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    (source / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (source / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    out = tmp_path / "data"
    result = prepare(str(source), out)
    assert result["linked"] == ["corpus.jsonl", "qrels", "queries.jsonl"]
    assert (out / "qrels" / "test.tsv").read_text().endswith("q1\td1\t1\n") and (out / "corpus.jsonl").is_symlink()
    prepare(str(source), out)                                                      # again: nothing to do
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReprolibError, match="no corpus file"):
        prepare(str(tmp_path / "empty"), tmp_path / "data2")
