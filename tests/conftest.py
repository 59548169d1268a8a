"""Shared fixtures: a private corpus-store cache per test, a synthetic dataset built once per session,
and the path of the shared real datasets (tests that need one skip when it is absent)."""
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_dataset(*parts):
    """The path of a dataset under SHARED; skips the calling test when it (or its corpus) is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared dataset {path} is not available")
    return path


@pytest.fixture(autouse=True)
def reprolib_cache(tmp_path_factory, monkeypatch):
    """Every test builds corpus stores in its own temp dir, never in ~/.cache/reprolib."""
    cache = tmp_path_factory.mktemp("reprolib-cache")
    monkeypatch.setenv("REPROLIB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("reprolib-session-cache")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory, session_cache):
    """A 2,000-passage synthetic dataset (MS MARCO layout, with train.negatives.tsv), built once.

    Treat it as read-only: tests that modify a dataset copy it first.
    """
    from reprolib.data.prepare import prepare

    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    with pytest.MonkeyPatch.context() as mp:  # the build's own store goes to the session cache, not ~/.cache
        mp.setenv("REPROLIB_CACHE", str(session_cache))
        prepare("synthetic", out, num_passages=2000, progress=False)
    return out


@pytest.fixture(scope="session")
def synthetic_corpus(synthetic_dir, session_cache):
    """The synthetic dataset's Corpus, opened once from the session cache (no rebuild per test)."""
    from reprolib.data.corpus import Corpus

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPROLIB_CACHE", str(session_cache))
        return Corpus.open(synthetic_dir, progress=False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine every extra thread waits."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, synthetic_corpus, one_torch_thread):
    """A random micro BERT with a WordPiece vocabulary from the synthetic corpus, saved as a reprolib
    encoder (mean pooling, normalized: a passage's own text is its nearest neighbour)."""
    from reprolib.modeling import DenseEncoder
    from reprolib.modeling.scratch import build_scratch_model

    root = tmp_path_factory.mktemp("tiny-encoder")
    build_scratch_model(synthetic_corpus, root / "init", size="micro", seed=0)
    encoder = DenseEncoder.from_pretrained(root / "init", pooling="mean", normalize=True, query_max_len=128,
                                           passage_max_len=128)
    return encoder.save(root / "model")
