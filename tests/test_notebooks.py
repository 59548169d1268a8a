"""Notebooks: committed clean, one parameters cell, and each one runs under papermill."""
import json
from pathlib import Path

import pytest

from reprolib.data import read_negatives, read_qrels, read_scores
from reprolib.pipeline import load_manifest, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs_and_has_one_parameters_cell(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs before committing"
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in cells) == 1
    ids = [c.get("id") for c in cells]
    assert all(ids) and len(set(ids)) == len(ids), "every cell needs its own id (nbformat 4.5)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """`papermill --help-notebook` and papermill's parameter checks see what the cell assigns (a second `=` in
    a line's comment hides that line from papermill's parser)."""
    import papermill

    assert set(papermill.inspect_notebook(str(path))) == _parameter_names(path)


def _cells(path, kind, parameters=True):
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind
            and (parameters or "parameters" not in c["metadata"].get("tags", []))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_teaches_goals_then_a_summary_and_exercises(path):
    text = "\n".join(_cells(path, "markdown"))
    goals, summary, exercises = (text.find(mark) for mark in ("**Goals.**", "## Summary", "## Exercises"))
    assert 0 <= goals < summary < exercises, "goals at the top, then a summary, then exercises"
    numbered = [line for line in text[exercises:].splitlines() if line[:3] in {f"{n}. " for n in range(1, 10)}]
    assert 2 <= len(numbered) <= 4, f"{len(numbered)} exercises (2-4 wanted)"


def _code_windows(text, size=3):
    """Runs of `size` consecutive code lines, comments, blank lines and imports left out."""
    lines = [" ".join(line.split("#")[0].split()) for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("import ", "from ")) and len(line) > 8]
    return {tuple(lines[i:i + size]) for i in range(len(lines) - size + 1)}


def test_no_notebook_repeats_library_code():
    """The notebooks call the library; they do not copy it. Checked on their code exported as text: no run of
    three lines also found in reprolib/, and no function defined under a name the library defines."""
    import ast

    library = ROOT / "reprolib"
    library_windows, library_names = set(), set()
    for module in library.rglob("*.py"):
        source = module.read_text()
        library_windows |= _code_windows(source)
        library_names |= {node.name for node in ast.walk(ast.parse(source))
                          if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for path in NOTEBOOKS:
        code = "\n".join(_cells(path, "code", parameters=False))
        copied = _code_windows(code) & library_windows
        assert not copied, f"{path.name} repeats library code: {sorted(copied)[0]}"
        defined = {node.name for node in ast.walk(ast.parse(code)) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & library_names, f"{path.name} redefines {sorted(defined & library_names)}"


def _tiny_pipeline(tmp_path):
    text = (ROOT / "params" / "quickstart.yaml").read_text().replace("num_passages: 5000", "num_passages: 1000")
    text = text.replace("num_dev_queries: 2000", "num_dev_queries: 200")
    text = text.replace("notebook: ", f"notebook: {ROOT / 'notebooks'}/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_quickstart_pipeline_runs_every_notebook_then_skips_and_resumes(tmp_path):
    params, out = _tiny_pipeline(tmp_path), tmp_path / "out"
    logs = []
    manifest = run_pipeline(params, out_root=out, log=logs.append)
    stages = manifest["stages"]
    assert all(e["status"] == "done" for e in stages.values()), {k: e["status"] for k, e in stages.items()}
    run_dir = out / "quickstart"
    assert (run_dir / "bm25" / "run.trec").stat().st_size > 0
    assert {"recall_at_k.png", "per_query.png", "scores.png"} <= {p.name for p in (run_dir / "bm25").iterdir()}
    assert 0.3 < stages["bm25"]["metrics"]["RR@10"] < 0.9
    # the dense path: a model trained on BM25 negatives, its index, mined negatives, a second stage
    assert {"loss.png", "scores_after.png", "train_log.csv"} <= {p.name for p in (run_dir / "finetune").iterdir()}
    assert (run_dir / "finetune" / "model" / "modules.json").exists()
    assert (run_dir / "index" / "index" / "index.json").exists()
    assert (run_dir / "mine" / "negatives.tsv").stat().st_size > 0
    assert stages["finetune"]["metrics"]["group_accuracy_after"] > stages["finetune"]["metrics"]["group_accuracy_before"]
    assert 0 < stages["finetune"]["metrics"]["passage_cosine_before"] < 0.9999   # mean pooling: passages differ at init
    assert stages["dense_hn"]["metrics"]["RR@10"] > 0.1      # 1,000 passages, one short epoch: it retrieves, not more
    assert (run_dir / "dense_bm25" / "run.trec").stat().st_size > 0
    assert " here against " in (run_dir / "dense" / "40_retrieve_evaluate.ipynb").read_text()   # paired test vs BM25
    per_query = json.loads((run_dir / "dense_hn" / "per_query.json").read_text())
    assert len(per_query["RR@10"]) == len(json.loads((run_dir / "bm25" / "per_query.json").read_text())["RR@10"]) > 0
    checks = json.loads((run_dir / "checks.json").read_text())
    assert [(c["stage"], c["reference_stage"]) for c in checks] == [("bm25", None), ("dense", "bm25"),
                                                                    ("dense_hn", "dense_bm25"), ("hybrid", "dense_hn")]
    # the hybrid: stage 2 fused with BM25, the weight picked on the training queries' runs
    assert {"weights.png", "fusion.png", "run.trec"} <= {p.name for p in (run_dir / "hybrid").iterdir()}
    assert stages["hybrid"]["metrics"]["first_RR@10"] == stages["dense_hn"]["metrics"]["RR@10"]
    assert all(c["p_value"] is not None for c in checks[1:])
    report = (run_dir / "REPORT.md").read_text()
    assert "Reproduction checks" in report and "dense_hn/loss.png" not in report and "finetune_hn/loss.png" in report
    _assert_reads_clean(run_dir)

    logs.clear()
    run_pipeline(params, out_root=out, log=logs.append)
    assert sum(line.startswith("skip") for line in logs) == len(stages)

    # A run killed during the bm25 stage leaves it "running"; the next run resumes there.
    manifest = load_manifest(run_dir)
    manifest["stages"]["bm25"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    logs.clear()
    run_pipeline(params, out_root=out, log=logs.append)
    ran = [line for line in logs if line.startswith("▶")]
    assert len(ran) == 1 and "bm25" in ran[0]


def _assert_reads_clean(run_dir):
    """What a student opening the executed notebooks must not see: red stderr boxes (a library's transient bar,
    a warning), widget views that reopen frozen, or a progress bar stored short of 100% (JupyterLab shows each
    stored redraw of a text bar as a line of its own)."""
    import re

    executed = sorted(run_dir.glob("*/[0-9][0-9]_*.ipynb"))
    assert executed
    for path in executed:
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                where = f"{path.relative_to(run_dir)}: {str(output)[:200]}"
                assert output.get("name") != "stderr", where
                assert "application/vnd.jupyter.widget-view+json" not in output.get("data", {}), where
                text = "".join(output.get("text", ""))
                assert "TqdmWarning" not in text and not re.search(r"(?<!\d)\d{1,2}%\|", text), where


def _parameter_names(notebook):
    import ast

    cells = json.loads(notebook.read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {target.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for target in node.targets}


@pytest.mark.parametrize("params_file", sorted((ROOT / "params").rglob("*.yaml")),
                         ids=lambda p: p.relative_to(ROOT / "params").as_posix())
def test_every_stage_param_is_a_parameter_of_its_notebook(params_file):
    """A misspelled key would reach papermill as an unknown parameter and be silently ignored."""
    from reprolib.pipeline import load_pipeline

    pipeline = load_pipeline(params_file)
    for stage in pipeline.stages:
        unknown = set(stage.params) - set(stage.declared)
        assert not unknown, f"{params_file.name}: stage {stage.id} passes {sorted(unknown)} to {stage.notebook.name}"


SPARSE_PIPELINE = """
run: sparse
defaults: {seed: 42}
stages:
  - {id: data, notebook: NB/00_prepare_data, params: {dataset: synthetic, num_passages: 1000}}
  - id: pretrain
    notebook: NB/11_pretrain_lexmae
    params: {model: "scratch:micro", train_data: "${stages.data.out}", passage_max_len: 48, batch_size: 8,
             max_steps: 6, learning_rate: 1.0e-3}
  - id: pretrain_mlm          # the control: no bottleneck, no decoder
    notebook: NB/11_pretrain_lexmae
    params: {model: "scratch:micro", train_data: "${stages.data.out}", passage_max_len: 48, batch_size: 8,
             max_steps: 2, learning_rate: 1.0e-3, decoder_loss_weight: 0.0}
  - id: finetune
    notebook: NB/21_finetune_sparse
    params: {model: "${stages.pretrain.out}/model", train_data: "${stages.data.out}", passage_max_len: 48,
             group_size: 4, batch_size: 8, max_steps: 6, learning_rate: 1.0e-3}
  - id: finetune_new_head     # a checkpoint without an MLM head: the notebook shows it calibrated, as trained
    notebook: NB/21_finetune_sparse
    params: {model: "scratch:micro", train_data: "${stages.data.out}", passage_max_len: 48,
             group_size: 4, batch_size: 8, max_steps: 2, learning_rate: 1.0e-3}
  - id: index
    notebook: NB/30_encode_index
    params: {model: "${stages.finetune.out}/model", corpus: "${stages.data.out}", template: lexmae,
             queries: "${stages.data.out}"}
  - id: sparse
    notebook: NB/40_retrieve_evaluate
    params: {method: sparse, model: "${stages.finetune.out}/model", index: "${stages.index.out}/index",
             corpus: "${stages.data.out}", queries: "${stages.data.out}", qrels: "${stages.data.out}", split: dev}
  - id: mine
    notebook: NB/50_mine_hard_negatives
    params: {model: "${stages.finetune.out}/model", index: "${stages.index.out}/index", corpus: "${stages.data.out}",
             queries: "${stages.data.out}", qrels: "${stages.data.out}", split: train, depth: 50}
"""


TEACHER_PIPELINE = """
run: teacher
defaults: {seed: 42}
stages:
  # sparse labels, as the Disentangled miniature's: half the facts stated by three passages, train labelling one
  - {id: data, notebook: NB/00_prepare_data, params: {dataset: synthetic, num_passages: 1000, unlabelled_twins: 0.5,
                                                      twins_per_fact: 2}}
  - id: pretrain
    notebook: NB/10_pretrain_retromae
    params: {model: "scratch:micro", train_data: "${stages.data.out}", passage_max_len: 48, batch_size: 8,
             max_steps: 6, learning_rate: 1.0e-3}
  - id: pretrain_mlm          # the control: no decoder
    notebook: NB/10_pretrain_retromae
    params: {model: "scratch:micro", train_data: "${stages.data.out}", passage_max_len: 48, batch_size: 8,
             max_steps: 2, learning_rate: 1.0e-3, decoder_loss_weight: 0.0}
  - id: finetune
    notebook: NB/20_finetune_dense
    params: {model: "${stages.pretrain.out}/model", train_data: "${stages.data.out}", pooling: cls,
             passage_max_len: 48, group_size: 4, batch_size: 8, max_steps: 6, learning_rate: 1.0e-3}
  - id: index
    notebook: NB/30_encode_index
    params: {model: "${stages.finetune.out}/model", corpus: "${stages.data.out}"}
  - id: dense
    notebook: NB/40_retrieve_evaluate
    params: {method: dense, model: "${stages.finetune.out}/model", index: "${stages.index.out}/index",
             corpus: "${stages.data.out}", queries: "${stages.data.out}", qrels: "${stages.data.out}", split: dev}
  - id: cross_encoder
    notebook: NB/60_cross_encoder
    params: {model: "${stages.pretrain.out}/model", train_data: "${stages.data.out}", passage_max_len: 64, group_size: 4,
             batch_size: 8, max_steps: 6, learning_rate: 1.0e-3, rerank_run: "${stages.dense.out}/run.trec",
             rerank_depth: 10, score_candidates: "${stages.data.out}/train.negatives.tsv", score_depth: 4}
  - id: distill
    notebook: NB/70_distill
    params: {model: "${stages.finetune.out}/model", train_data: "${stages.data.out}", passage_max_len: 48,
             teacher_scores: "${stages.cross_encoder.out}/teacher_scores.tsv", group_size: 4, batch_size: 8,
             max_steps: 6, learning_rate: 1.0e-3}
  # a second teacher: the dense run fused with BM25's (notebook 41), and a Margin-MSE student of it
  - id: bm25
    notebook: NB/40_retrieve_evaluate
    params: {method: bm25, corpus: "${stages.data.out}", queries: "${stages.data.out}", qrels: "${stages.data.out}",
             split: dev}
  - id: bm25_train
    notebook: NB/40_retrieve_evaluate
    params: {method: bm25, corpus: "${stages.data.out}", queries: "${stages.data.out}", qrels: "${stages.data.out}",
             split: train, topk: 50}
  - id: dense_train
    notebook: NB/40_retrieve_evaluate
    params: {method: dense, model: "${stages.finetune.out}/model", index: "${stages.index.out}/index", topk: 50,
             corpus: "${stages.data.out}", queries: "${stages.data.out}", qrels: "${stages.data.out}", split: train}
  - id: hybrid
    notebook: NB/41_fuse_runs
    params: {first_run: "${stages.dense.out}/run.trec", second_run: "${stages.bm25.out}/run.trec",
             first_train_run: "${stages.dense_train.out}/run.trec", second_train_run: "${stages.bm25_train.out}/run.trec",
             data: "${stages.data.out}", teacher_depth: 4}
  - id: distill_hybrid
    notebook: NB/70_distill
    params: {model: "${stages.finetune.out}/model", train_data: "${stages.data.out}", passage_max_len: 48,
             teacher_scores: "${stages.hybrid.out}/teacher_scores.tsv", distillation: margin_mse,
             contrastive_weight: 0.0, group_size: 4, batch_size: 8, max_steps: 6, learning_rate: 1.0e-3}
expected:
  - {stage: cross_encoder, metric: RR@10, than: cross_encoder, than_metric: first_stage_RR@10, source: reranking}
"""


def run_to_the_end(tmp_path, pipeline_text):
    """Run a pipeline YAML whose notebooks are named NB/<name>; every stage must finish. (stages, run dir)"""
    params = tmp_path / "pipeline.yaml"
    params.write_text(pipeline_text.replace("NB/", f"{ROOT / 'notebooks'}/"))
    manifest = run_pipeline(params, out_root=tmp_path / "out", log=lambda *_: None)
    stages = manifest["stages"]
    assert all(e["status"] == "done" for e in stages.values()), {k: e["status"] for k, e in stages.items()}
    _assert_reads_clean(tmp_path / "out" / manifest["run"])
    return stages, tmp_path / "out" / manifest["run"]


def test_pretraining_teacher_and_distillation_notebooks_run_end_to_end(tmp_path):
    stages, run_dir = run_to_the_end(tmp_path, TEACHER_PIPELINE)
    generated = json.loads((run_dir / "data" / "synthetic.json").read_text())
    assert (generated["unlabelled_twins"], generated["twins_per_fact"]) == (0.5, 2)
    judged = [len(passages) for passages in read_qrels(run_dir / "data" / "qrels.dev.tsv").values()]
    assert max(judged) == 3 and min(judged) == 1
    assert {len(passages) for passages in read_qrels(run_dir / "data" / "qrels.train.tsv").values()} == {1}
    assert {"decoder_mask.png", "loss.png"} <= {p.name for p in (run_dir / "pretrain").iterdir()}
    assert stages["pretrain"]["metrics"]["train_steps"] == 6
    assert "decoder_loss" in stages["pretrain"]["metrics"] and "decoder_loss" not in stages["pretrain_mlm"]["metrics"]
    assert {"loss.png", "rerank.png", "teacher_scores.png"} <= {p.name for p in (run_dir / "cross_encoder").iterdir()}
    assert stages["cross_encoder"]["metrics"]["teacher_queries"] > 0
    assert {"RR@10", "first_stage_RR@10"} <= set(json.loads((run_dir / "cross_encoder" / "per_query.json").read_text()))
    assert {"loss.png", "margins.png"} <= {p.name for p in (run_dir / "distill").iterdir()}
    check = json.loads((run_dir / "checks.json").read_text())[0]
    assert check["reference_metric"] == "first_stage_RR@10" and check["p_value"] is not None
    # the fused teacher: each training query's top 4 scored (positives added), the same top 4 as negatives
    teacher = read_scores(run_dir / "hybrid" / "teacher_scores.tsv")
    negatives = read_negatives(run_dir / "hybrid" / "negatives.tsv")
    assert stages["hybrid"]["metrics"]["teacher_queries"] == len(teacher) > 0
    qrels = read_qrels(run_dir / "data" / "qrels.train.tsv")
    for qid, hits in teacher.items():
        positives = {pid for pid, rel in qrels[qid].items() if rel > 0}
        assert set(negatives.get(qid, [])) == set(hits) - positives and len(set(hits) - positives) <= 4
    assert stages["distill_hybrid"]["metrics"]["train_steps"] == 6


def test_prepare_data_refuses_twins_for_a_dataset_with_its_own_labels(tmp_path):
    from reprolib.errors import ReprolibError

    params = tmp_path / "pipeline.yaml"
    params.write_text(f"""run: twins
stages:
  - {{id: data, notebook: {ROOT / 'notebooks'}/00_prepare_data, params: {{dataset: beir/scifact, unlabelled_twins: 0.5}}}}
""")
    with pytest.raises(ReprolibError, match="ValueError: unlabelled_twins and twins_per_fact are options of the synthetic data, not of 'beir/scifact'"):
        run_pipeline(params, out_root=tmp_path / "out", log=lambda *_: None)


def test_lexmae_then_sparse_retriever_notebooks_run_end_to_end(tmp_path):
    stages, run_dir = run_to_the_end(tmp_path, SPARSE_PIPELINE)
    assert {"loss.png", "bottleneck_terms.png"} <= {p.name for p in (run_dir / "pretrain").iterdir()}
    assert "decoder_loss" in stages["pretrain"]["metrics"] and "decoder_loss" not in stages["pretrain_mlm"]["metrics"]
    assert {"flops.png", "sparsity.png", "query_terms.png"} <= {p.name for p in (run_dir / "finetune").iterdir()}
    assert stages["finetune"]["metrics"]["nonzeros_per_passage"] > 0
    # a new head starts at ~256 of its 2,000 terms per passage (calibrated), not at nearly all of them
    assert 100 < stages["finetune_new_head"]["metrics"]["nonzeros_per_passage_before"] < 500
    assert {"RR@10", "quantized_RR@10"} <= set(stages["sparse"]["metrics"])
    assert (run_dir / "mine" / "negatives.tsv").stat().st_size > 0
