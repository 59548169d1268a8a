"""Zero-shot evaluation over many datasets (reprolib.zero_shot, notebook 80) and the run report's checks plot
and stage walk (notebook 90)."""
import json
from pathlib import Path

import numpy as np
import pytest

from reprolib import plots, report, zero_shot
from reprolib.errors import ReprolibError
from reprolib.zero_shot import Dataset, Settings

ROOT = Path(__file__).resolve().parents[1]


# ---- dataset entries -------------------------------------------------------------------------

def test_named_entries_get_short_names_and_query_sets():
    assert zero_shot.parse_dataset("beir/scifact") == Dataset("scifact", "beir/scifact", "test")
    assert zero_shot.parse_dataset("beir/nfcorpus@dev") == Dataset("nfcorpus-dev", "beir/nfcorpus", "dev")
    assert zero_shot.parse_dataset("lotte/technology/test") == Dataset(
        "lotte-technology-test-search", "lotte/technology/test", "search")
    assert zero_shot.parse_dataset("lotte/writing/dev@forum", split="test") == Dataset(
        "lotte-writing-dev-forum", "lotte/writing/dev", "forum")


def test_a_directory_is_named_after_itself_and_may_name_its_split(tmp_path):
    folder = tmp_path / "my@data" / "fiqa"  # an "@" inside the path is not a query set
    folder.mkdir(parents=True)
    assert zero_shot.parse_dataset(str(folder), split="dev") == Dataset("fiqa", str(folder), "dev")
    assert zero_shot.parse_dataset(f"{folder}@train") == Dataset("fiqa-train", str(folder), "train")
    versioned = tmp_path / "scifact@v2"   # a folder whose own name has one
    versioned.mkdir()
    assert zero_shot.parse_dataset(str(versioned)) == Dataset("scifact-v2", str(versioned), "test")


@pytest.mark.parametrize("entry, message", [
    ("lotte/technology/test@questions", "LoTTE's query sets are search and forum"),
    ("beir", "unknown dataset 'beir'"),
    ("msmarco-passage", "unknown dataset"),
])
def test_bad_entries_are_named(entry, message):
    with pytest.raises(ReprolibError, match=message):
        zero_shot.parse_dataset(entry)


def test_entries_must_have_distinct_short_names():
    assert [d.name for d in zero_shot.parse_datasets("beir/scifact beir/fiqa")] == ["scifact", "fiqa"]
    with pytest.raises(ReprolibError, match="short name 'scifact'"):
        zero_shot.parse_datasets(["beir/scifact", "beir/scifact"])


def test_named_datasets_are_prepared_under_data_dir_with_shared_downloads(tmp_path, monkeypatch):
    import reprolib.data.prepare

    calls = []
    monkeypatch.setattr(reprolib.data.prepare, "prepare",
                        lambda name, out, **options: calls.append((name, out, options)))
    got = zero_shot.dataset_dir(zero_shot.parse_dataset("lotte/science/test@forum"), tmp_path / "data", progress=False)
    assert got == tmp_path / "data" / "lotte" / "science" / "test"
    assert calls == [("lotte/science/test", got, {"progress": False, "download_dir": tmp_path / "data" / "downloads"})]
    local = zero_shot.parse_dataset(str(tmp_path))
    assert zero_shot.dataset_dir(local, tmp_path / "data") == tmp_path and len(calls) == 1  # read in place


def test_subsets_are_the_folder_or_its_forums(tmp_path):
    (tmp_path / "single" / "corpus.jsonl").parent.mkdir()
    (tmp_path / "single" / "corpus.jsonl").write_text("")
    assert zero_shot.subsets(tmp_path / "single") == [tmp_path / "single"]
    for forum in ("wordpress", "android"):  # CQADupStack's layout
        (tmp_path / "cqa" / forum).mkdir(parents=True)
        (tmp_path / "cqa" / forum / "corpus.jsonl").write_text("")
    (tmp_path / "cqa" / "downloads").mkdir()
    assert zero_shot.subsets(tmp_path / "cqa") == [tmp_path / "cqa" / "android", tmp_path / "cqa" / "wordpress"]
    with pytest.raises(ReprolibError, match="no corpus file"):
        zero_shot.subsets(tmp_path / "cqa" / "downloads")


@pytest.mark.parametrize("corpus, drops", [("corpus.jsonl", True), ("collection.tsv", False), ("corpus.tsv", False)])
def test_identical_ids_are_dropped_only_in_beir_layout(tmp_path, corpus, drops):
    (tmp_path / corpus).write_text("")
    assert zero_shot.drops_identical_ids(tmp_path) is drops


def test_search_index_follows_the_index_kind(monkeypatch):
    import reprolib.index
    import reprolib.search

    calls = []
    for kind in ("dense", "sparse"):
        monkeypatch.setattr(reprolib.search, f"{kind}_search", lambda *args, kind=kind, **kw: calls.append((kind, kw)))
    for kind in ("sparse", "dense"):
        monkeypatch.setattr(reprolib.index, "load_meta", lambda _, kind=kind: {"kind": kind})
        reprolib.search.search_index(None, {}, "index", None, topk=5, batch_size=2, max_length=9, progress=False)
    expected = {"topk": 5, "batch_size": 2, "max_length": 9, "progress": False}
    assert calls == [("sparse", {**expected, "quantize": False}), ("dense", expected)]
    with pytest.raises(ReprolibError, match="index is a dense index: quantized search is for sparse"):
        reprolib.search.search_index(None, {}, "index", None, quantize=True)


# ---- evaluating datasets with a hand-made encoder --------------------------------------------

VECTORS = {"apple": [1, 0, 0.5], "banana": [0, 1, 0], "cherry": [0.5, 0, 1]}


class FruitEncoder:
    """Each text is a fruit name with a fixed vector: exact scores, no model."""
    kind = "dense"

    def encode_passages(self, items, **_):
        return np.array([VECTORS[text] for _title, text in items], dtype=np.float32)

    def encode_queries(self, texts, **_):
        return np.array([VECTORS[text] for text in texts], dtype=np.float32)


class NoEncoder:
    kind = "dense"

    def encode_passages(self, *_, **__):
        raise AssertionError("saved results should have been reused")

    encode_queries = encode_passages


def write_beir(folder, qrels):
    """ArguAna-like: query "a" is also document "a"; its relevant document is another one."""
    folder.mkdir(parents=True)
    docs = [("a", "apple"), ("b", "banana"), ("c", "cherry")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in docs))
    (folder / "queries.jsonl").write_text('{"_id": "a", "text": "apple"}\n{"_id": "q2", "text": "banana"}\n')
    (folder / "qrels").mkdir()
    judged = "".join(f"{q}\t{d}\t1\n" for q, d in qrels)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + judged)
    return folder


def test_identical_id_rule_decides_the_query_that_is_a_document(tmp_path):
    data = write_beir(tmp_path / "arguana", [("a", "c"), ("q2", "b")])
    dataset = zero_shot.parse_dataset(str(data))
    # query a ranks a (1.25) > c (1.0) > b: without the rule its relevant c is at rank 2
    kept = zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, tmp_path / "kept",
                                      Settings("fruit", metrics="nDCG@10", ignore_identical_ids=False), progress=False)
    assert kept["metrics"]["nDCG@10"] == pytest.approx((1 / np.log2(3) + 1) / 2)
    dropped = zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, tmp_path / "dropped",
                                         Settings("fruit", metrics="nDCG@10"), progress=False)
    assert dropped["metrics"]["nDCG@10"] == 1.0
    assert (dropped["passages"], dropped["queries"]) == (3, 2)
    run = (tmp_path / "dropped" / "arguana" / "run.trec").read_text().splitlines()
    assert run[0].split()[:3] == ["a", "Q0", "a"]  # the run keeps the hit; only the evaluation drops it


def test_forums_are_averaged_and_saved_results_are_reused(tmp_path):
    parent = tmp_path / "cqadupstack"
    write_beir(parent / "android", [("a", "c"), ("q2", "b")])      # nDCG@10 1.0
    write_beir(parent / "gis", [("a", "c"), ("q2", "c")])          # q2 finds c at rank 2
    dataset, out = zero_shot.parse_dataset(str(parent)), tmp_path / "out"
    settings = Settings("fruit", metrics="nDCG@10 R@100")
    found = zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, out, settings, progress=False)
    forums = found["subsets"]
    assert list(forums) == ["android", "gis"]
    assert forums["gis"]["metrics"]["nDCG@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert found["metrics"]["nDCG@10"] == pytest.approx((forums["android"]["metrics"]["nDCG@10"]
                                                         + forums["gis"]["metrics"]["nDCG@10"]) / 2)
    assert found["passages"] == 6 and (out / "cqadupstack" / "gis" / "run.trec").exists()

    assert zero_shot.evaluate_dataset(NoEncoder(), dataset, None, out, settings) == found
    with pytest.raises(ReprolibError, match="another model"):
        zero_shot.evaluate_dataset(NoEncoder(), dataset, None, out, Settings("other", metrics="nDCG@10 R@100"))
    # another depth reuses the index but searches and scores again
    again = zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, out, Settings("fruit", "nDCG@10 R@100", topk=2),
                                       progress=False)
    assert again["settings"]["topk"] == 2


class Interrupted(FruitEncoder):
    def encode_queries(self, *_, **__):
        raise RuntimeError("killed")


def test_an_interrupted_dataset_resumes_but_only_with_its_model(tmp_path):
    dataset = zero_shot.parse_dataset(str(write_beir(tmp_path / "arguana", [("a", "c"), ("q2", "b")])))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):  # after the encoding, before the search
        zero_shot.evaluate_dataset(Interrupted(), dataset, None, out, Settings("fruit"), progress=False)
    assert (out / "arguana" / "index" / "index.json").exists()
    with pytest.raises(ReprolibError, match="another model and template"):
        zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, out, Settings("other", template="openmatch"))
    found = zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, out, Settings("fruit"), progress=False)
    assert found["metrics"]["nDCG@10"] == 1.0


class RetrainedFruit(FruitEncoder):
    """The "fruit" model trained again at the same path: it ranks cherry first for every query."""

    def encode_queries(self, texts, **_):
        return np.array([VECTORS["cherry"] for _ in texts], dtype=np.float32)


def test_saved_results_are_of_one_model_and_one_dataset(tmp_path, monkeypatch):
    from reprolib import index

    monkeypatch.setattr(index, "model_fingerprint", lambda encoder: type(encoder).__name__)   # its weights, in a model
    out, settings = tmp_path / "out", Settings("fruit", metrics="nDCG@10")
    dataset = zero_shot.parse_dataset(str(write_beir(tmp_path / "arguana", [("a", "c"), ("q2", "b")])))
    assert zero_shot.evaluate_dataset(FruitEncoder(), dataset, None, out, settings, progress=False)["metrics"][
        "nDCG@10"] == 1.0
    retrained = zero_shot.evaluate_dataset(RetrainedFruit(), dataset, None, out, settings, progress=False)
    assert retrained["metrics"]["nDCG@10"] == pytest.approx((1 + 1 / np.log2(4)) / 2)   # q2 finds b at rank 3
    # the same folder named relatively: the same dataset, its saved results returned without encoding
    monkeypatch.chdir(tmp_path)
    relative = zero_shot.parse_dataset("arguana")
    saved = json.loads((out / "arguana" / "results.json").read_text())
    (out / "arguana" / "results.json").write_text(json.dumps({**saved, "dataset": "arguana"}))   # as saved before
    with monkeypatch.context() as patch:
        patch.setattr(RetrainedFruit, "encode_queries", None)
        for named in (relative, dataset):
            found = zero_shot.evaluate_dataset(RetrainedFruit(), named, None, out, settings, progress=False)
            assert found["metrics"] == retrained["metrics"]
    # another folder of the same name: its own qrels, not the saved numbers
    other = zero_shot.parse_dataset(str(write_beir(tmp_path / "elsewhere" / "arguana", [("a", "c"), ("q2", "a")])))
    found = zero_shot.evaluate_dataset(RetrainedFruit(), other, None, out, settings, progress=False)
    assert found["dataset"] == other.source and found["metrics"]["nDCG@10"] != retrained["metrics"]["nDCG@10"]


def test_summary_averages_over_datasets_and_flattens_for_save_metrics():
    results = {"scifact": {"split": "test", "passages": 5183, "queries": 300, "seconds": 10.0,
                           "metrics": {"nDCG@10": 0.6, "R@100": 0.9}},
               "fiqa": {"split": "test", "passages": 57638, "queries": 648, "seconds": 50.0,
                        "metrics": {"nDCG@10": 0.3, "R@100": 0.6}}}
    rows = zero_shot.summarize(results)
    assert list(rows) == ["scifact", "fiqa", "average"]
    assert rows["average"] == pytest.approx({"nDCG@10": 0.45, "R@100": 0.75})
    flat = zero_shot.flat_metrics(rows)
    assert flat["scifact_nDCG@10"] == 0.6 and flat["average_nDCG@10"] == pytest.approx(0.45) and len(flat) == 6
    table = zero_shot.results_table(results).splitlines()
    assert table[0] == "| dataset | split | passages | queries | nDCG@10 | R@100 | seconds |"
    assert table[2] == "| scifact | test | 5,183 | 300 | 0.6000 | 0.9000 | 10.0 |"
    assert table[-1] == "| **average** |  |  |  | **0.4500** | **0.7500** |  |"


# ---- plots and the stage walk ------------------------------------------------------------------

CHECKS = [
    {"stage": "eval", "metric": "RR@10", "value": "0.393", "tolerance": 0.005, "source": "", "measured": 0.3931,
     "difference": 0.0001, "p_value": None, "status": "OK"},
    {"stage": "eval", "metric": "R@1000", "value": "0.900", "tolerance": 0.01, "source": "", "measured": 0.905,
     "difference": 0.005, "p_value": None, "status": "OKISH"},
    {"stage": "beir", "metric": "average_nDCG@10", "value": "0.45", "tolerance": 0.01, "source": "", "measured": 0.2,
     "difference": -0.25, "p_value": None, "status": "FAIL"},
    {"stage": "beir", "metric": "scifact_nDCG@10", "value": "0.5", "tolerance": 0.0, "source": "", "measured": None,
     "difference": None, "p_value": None, "status": "FAIL"},
    {"stage": "hn", "metric": "RR@10", "than": "bm25", "by": 0.02, "source": "", "measured": 0.8,
     "difference": 0.1, "p_value": 0.001, "status": "OK"},
]


def test_checks_plot_draws_bound_and_non_inferiority_checks(tmp_path):
    """An `at_most` bound (its line is 0) and a `loses_at_most` claim (a tick at minus the loss allowed)."""
    rows = [{"stage": "index", "metric": "passages_nonzeros_mean", "at_most": 300, "source": "", "measured": 138.0,
             "difference": -162.0, "p_value": None, "status": "OK"},
            {"stage": "dense", "metric": "nDCG@10", "than": "control", "loses_at_most": 0.01, "source": "",
             "measured": 0.59, "difference": -0.08, "p_value": 1.0, "status": "FAIL"}]
    ax = plots.checks_plot(rows, path=tmp_path / "checks.png").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["index passages_nonzeros_mean (at most 300)",
                                                           "dense nDCG@10 (vs control)"]
    assert [tuple(np.round(c.get_offsets()[0], 4)) for c in ax.collections] == [(-162.0, 0.0), (-0.01, 1.0),
                                                                                (-0.08, 1.0)]


def test_checks_plot_draws_one_line_per_check_coloured_by_status(tmp_path):
    from matplotlib.colors import to_hex

    fig = plots.checks_plot(CHECKS, path=tmp_path / "checks.png")
    ax = fig.axes[0]
    assert (tmp_path / "checks.png").stat().st_size > 0
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "eval RR@10 (paper 0.393)" and labels[-1] == "hn RR@10 (vs bm25)"
    assert len(labels) == len(CHECKS)
    points = [(tuple(np.round(c.get_offsets()[0], 4)), to_hex(c.get_facecolor()[0])) for c in ax.collections]
    assert points[:4] == [((0.0001, 0.0), to_hex("tab:green")), ((0.005, 1.0), to_hex("tab:orange")),
                          ((-0.25, 2.0), to_hex("tab:red")), ((0.0, 3.0), to_hex("tab:red"))]
    assert points[-2:] == [((0.02, 4.0), to_hex("0.4")), ((0.1, 4.0), to_hex("tab:green"))]   # margin tick, then dot
    bands = [(round(p.get_x(), 4), round(p.get_width(), 4)) for p in ax.patches]
    assert bands == [(-0.005, 0.01), (-0.01, 0.02), (-0.01, 0.02), (0.0, 0.0)]   # the tolerance, either side
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["OK", "OKISH", "FAIL", "missing", "margin to win by", "reference", "tolerance"]


def test_dataset_bars_draw_one_bar_per_dataset_and_metric(tmp_path):
    rows = {"scifact": {"nDCG@10": 0.6, "R@100": 0.9}, "fiqa": {"nDCG@10": 0.3, "R@100": 0.6},
            "average": {"nDCG@10": 0.45, "R@100": 0.75}}
    ax = plots.dataset_bars(rows, path=tmp_path / "bars.png").axes[0]
    assert (tmp_path / "bars.png").exists() and len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["scifact", "fiqa", "average"]


def fake_run(tmp_path):
    """A finished run dir: two stages with metrics and plots, a report stage, a pipeline with checks."""
    run_dir = tmp_path / "run"
    params = tmp_path / "p.yaml"
    params.write_text(f"""run: run
notebook_dir: {ROOT / 'notebooks'}
stages:
  - {{id: bm25, notebook: 40_retrieve_evaluate}}
  - {{id: beir, notebook: 80_beir_zero_shot}}
  - {{id: report, notebook: 90_report}}
expected:
  - {{stage: bm25, metric: RR@10, value: 0.393, tolerance: 0.005, source: paper}}
  - {{stage: beir, metric: average_nDCG@10, value: 0.45, tolerance: 0.01, source: paper}}
  - {{stage: beir, metric: scifact_R@100, value: 0.9, tolerance: 0.01, source: paper}}
""")
    stages = {
        "bm25": {"notebook": "40_retrieve_evaluate.ipynb", "status": "done", "wall_s": 12.5,
                 "metrics": {"RR@10": 0.3931, "R@100": 0.8}, "error": None},
        "beir": {"notebook": "80_beir_zero_shot.ipynb", "status": "failed", "wall_s": 3.0,
                 "metrics": {"scifact_nDCG@10": 0.5, "average_nDCG@10": 0.2}, "error": "cell 4: KeyError: 'x'"},
        "report": {"notebook": "90_report.ipynb", "status": "running", "wall_s": None, "metrics": {}, "error": None},
    }
    for sid in stages:
        (run_dir / sid).mkdir(parents=True)
    plots.recall_curve({"bm25": {1: 0.2, 10: 0.6}}, path=run_dir / "bm25" / "recall_at_k.png")
    (run_dir / "bm25" / "sub").mkdir()
    plots.loss_curve({"x": ([1, 2], [2.0, 1.0])}, path=run_dir / "bm25" / "sub" / "loss.png")
    plots.metric_bars({"report": {"x": 1}}, path=run_dir / "report" / "old.png")
    manifest = {"run": "run", "params_file": str(params), "stages": stages}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir, manifest


def test_stage_overview_walks_the_stages_in_run_order(tmp_path):
    run_dir, manifest = fake_run(tmp_path)
    stages = report.stage_overview(run_dir, manifest, skip=run_dir / "report")
    assert [s["id"] for s in stages] == ["bm25", "beir"]
    assert stages[0]["plots"] == [run_dir / "bm25" / "recall_at_k.png", run_dir / "bm25" / "sub" / "loss.png"]
    assert report.format_stage(stages[0]).splitlines() == ["bm25 (40_retrieve_evaluate.ipynb): done in 12.5 s",
                                                           "  RR@10=0.3931  R@100=0.8"]
    assert report.format_stage(stages[1]).splitlines()[-1] == "  error: cell 4: KeyError: 'x'"
    assert [s["id"] for s in report.stage_overview(run_dir, manifest)][-1] == "report"


def execute(notebook, out_dir, **params):
    import papermill

    papermill.execute_notebook(str(ROOT / "notebooks" / notebook), str(out_dir / notebook), cwd=str(out_dir),
                               parameters={**params, "out_dir": str(out_dir)}, kernel_name="python3",
                               progress_bar=False)
    return json.loads((out_dir / notebook).read_text())


def outputs(notebook, kind):
    return [o for c in notebook["cells"] for o in c.get("outputs", []) if kind in o.get("data", {})
            or (kind == "text" and o.get("name") == "stdout")]


def test_report_notebook_plots_the_checks_and_walks_every_stage(tmp_path):
    run_dir, _ = fake_run(tmp_path)
    out_dir = run_dir / "report"
    executed = execute("90_report.ipynb", out_dir, run_dir=str(run_dir))
    assert {"checks.png", "metrics.png"} <= {p.name for p in out_dir.iterdir()}
    assert json.loads((out_dir / "metrics.json").read_text()) == {"checks_failed": 2}
    text = "".join("".join(o["text"]) for o in outputs(executed, "text"))
    assert "OK     bm25 RR@10 = 0.3931 (0.393, paper)" in text
    assert "bm25 (40_retrieve_evaluate.ipynb): done in 12.5 s" in text and "error: cell 4: KeyError" in text
    assert "report (90_report" not in text  # its own plots are shown above the walk, not again
    walk = [c for c in executed["cells"] if c["cell_type"] == "code"][-1]["outputs"]
    assert sum("image/png" in o.get("data", {}) for o in walk) == 2  # the two PNGs of stage bm25


# ---- notebook 80 on two tiny synthetic datasets -------------------------------------------------

@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """Corpus stores of the module's fixtures go to a temp dir, never to ~/.cache/reprolib."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPROLIB_CACHE", str(tmp_path_factory.mktemp("zero-shot-cache")))
        yield


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory, module_cache):
    from reprolib.data.prepare import prepare_synthetic

    root = tmp_path_factory.mktemp("zero-shot-data")
    for name, seed in (("alpha", 1), ("beta", 2)):
        prepare_synthetic(root / name, num_passages=1000, num_train_queries=100, num_dev_queries=30, seed=seed,
                          bm25_depth=20, progress=False)
    return root / "alpha", root / "beta"


@pytest.fixture(scope="module")
def micro_model(tiny_datasets, tmp_path_factory, module_cache):
    """A random micro BERT with a vocabulary from one dataset, mean-pooled and normalized."""
    from reprolib.data.corpus import Corpus
    from reprolib.modeling import DenseEncoder
    from reprolib.modeling.scratch import build_scratch_model

    root = tmp_path_factory.mktemp("zero-shot-model")
    build_scratch_model(Corpus.open(tiny_datasets[0], progress=False), root / "init", size="micro", seed=0)
    encoder = DenseEncoder.from_pretrained(root / "init", pooling="mean", normalize=True, query_max_len=32,
                                           passage_max_len=64)
    return encoder.save(root / "model")


def test_zero_shot_notebook_scores_each_dataset_and_their_average(tmp_path, tiny_datasets, micro_model):
    out_dir = tmp_path / "zero_shot"
    out_dir.mkdir()
    execute("80_beir_zero_shot.ipynb", out_dir, model=str(micro_model), datasets=[str(d) for d in tiny_datasets],
            data_dir=str(tmp_path / "datasets"), split="dev", metrics="nDCG@10 R@100", batch_size=64, topk=100)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert set(metrics) == {f"{name}_{m}" for name in ("alpha", "beta", "average") for m in ("nDCG@10", "R@100")}
    assert all(0 <= value <= 1 for value in metrics.values())
    assert metrics["average_nDCG@10"] == pytest.approx((metrics["alpha_nDCG@10"] + metrics["beta_nDCG@10"]) / 2)
    assert metrics["alpha_R@100"] > 0  # a random model still ranks something relevant in a tenth of the corpus
    assert (out_dir / "zero_shot.png").exists()
    for name in ("alpha", "beta"):
        assert (out_dir / name / "index" / "index.json").exists() and (out_dir / name / "run.trec").exists()
        assert json.loads((out_dir / name / "results.json").read_text())["queries"] == 30
