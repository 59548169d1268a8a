"""Training groups (both samplers), the Accelerate loop (logs, saved model, resume with the same data
order) and the multi-process launcher, on the synthetic data set with a micro BERT built from it."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from reprolib.data.groups import TrainGroups, epoch_order  # noqa: E402
from reprolib.errors import ReprolibError  # noqa: E402
from reprolib.training import SUMMARY_FILE, TrainConfig, launch, read_log, run_digest, train  # noqa: E402


class ListCorpus:
    """A stand-in corpus: pids "p0".."p{n-1}", title = pid."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def positions(self, pids):
        return np.array([int(p[1:]) if p[1:].isdigit() and int(p[1:]) < self.n else -1 for p in pids], dtype=np.int64)

    def title(self, i):
        return f"p{i}"

    def text(self, i):
        return f"text {i}"


def _groups(sampler, negatives, group_size=4, topk=200, n=100, per_query=None, without_negatives="random"):
    queries = {"q1": "first query", "q2": "second query"}
    qrels = {"q1": {"p0": 1, "p1": 1}, "q2": {"p2": 1}}
    return TrainGroups(ListCorpus(n), queries, qrels, negatives, group_size=group_size, sampler=sampler,
                       sample_neg_from_topk=topk, per_query=per_query, seed=7, without_negatives=without_negatives)


def test_retromae_sampler_one_example_per_qrels_row_negatives_from_topk_without_replacement():
    negatives = {"q1": [f"p{i}" for i in range(10, 40)], "q2": [f"p{i}" for i in range(50, 60)]}
    groups = _groups("retromae", negatives, group_size=6, topk=5)
    assert len(groups) == 3                              # q1 has two qrels rows
    seen = set()
    for epoch in range(20):
        groups.set_epoch(epoch)
        query, texts, positions, positives, _ = groups[0]
        assert query == "first query" and positives == [0, 1]
        assert positions[0] == 0                           # the row's own positive, first in the group
        negs = positions[1:]
        assert len(set(negs)) == 5 and set(negs) <= set(range(10, 15))   # all of the top-5, no repeats
        assert texts[1] == f"p{negs[0]} text {negs[0]}"
        seen.add(tuple(negs))
    assert len(seen) > 1                                  # the order is re-drawn each epoch


def test_retromae_sampler_tops_up_from_the_corpus_when_short():
    groups = _groups("retromae", {"q2": ["p20", "p21"]}, group_size=8, n=30)
    positions = groups[2].positions
    assert positions[:3] == [2, 20, 21] and len(positions) == 8 and 2 not in positions[1:]
    q1 = groups[0].positions                               # q1 has no negatives at all: all random, never a positive
    assert len(q1) == 8 and not set(q1[1:]) & {0, 1}


@pytest.mark.parametrize("sampler", ["retromae", "tevatron"])
def test_queries_without_negatives_can_be_left_out(sampler):
    """OpenMatch, LexMAE and Tevatron train only the queries of their negatives file (correction 6)."""
    groups = _groups(sampler, {"q2": ["p20", "p21"]}, without_negatives="skip")
    assert groups.skipped_queries == ["q1"] and {groups[i].query for i in range(len(groups))} == {"second query"}
    with pytest.raises(ReprolibError, match="and a negative"):
        _groups(sampler, {}, without_negatives="skip")
    with pytest.raises(ReprolibError, match="without_negatives must be one of random, skip"):
        _groups(sampler, {}, without_negatives="drop")


def test_tevatron_sampler_walks_a_fixed_shuffle_by_epoch():
    negatives = {"q1": [f"p{i}" for i in range(10, 19)], "q2": ["p50"]}
    groups = _groups("tevatron", negatives, group_size=4)
    assert len(groups) == 2                               # one example per query
    windows = []
    for epoch in range(3):
        groups.set_epoch(epoch)
        positions = groups[0].positions
        windows.append(positions[1:])
    assert sorted(p for w in windows for p in w) == list(range(10, 19))   # three windows of 3 cover all 9
    positives = set()
    for epoch in range(2):
        groups.set_epoch(epoch)
        positives.add(groups[0].positions[0])
    assert positives == {0, 1}                            # the positive rotates with the epoch
    assert groups[1][2][1:] == [50, 50, 50]               # fewer than G-1: drawn with replacement


def test_samples_and_epoch_order_are_deterministic():
    negatives = {"q1": [f"p{i}" for i in range(10, 40)]}
    a, b = _groups("retromae", negatives), _groups("retromae", negatives)
    a.set_epoch(3), b.set_epoch(3)
    assert a[0] == b[0] and a[2] == b[2]
    assert (epoch_order(50, 2, 42) == epoch_order(50, 2, 42)).all()
    assert not (epoch_order(50, 1, 42) == epoch_order(50, 2, 42)).all()


@pytest.mark.parametrize("sampler", ["retromae", "tevatron"])
def test_a_list_of_negatives_trains_each_query_once_per_source(sampler):
    """Tevatron's stage 2 reads its mined groups beside its BM25 ones: one group per query and source an epoch,
    each drawn from its own source; a list of one source is the source itself."""
    mined = {"q1": [f"p{i}" for i in range(10, 20)], "q2": [f"p{i}" for i in range(20, 30)]}
    bm25 = {"q1": [f"p{i}" for i in range(50, 60)], "q2": [f"p{i}" for i in range(60, 70)]}
    one, both = _groups(sampler, mined, per_query=True), _groups(sampler, [mined, bm25], per_query=True)
    assert len(both) == 2 * len(one) == 4
    assert [group.query for group in both] == ["first query", "second query"] * 2
    assert [both[i] for i in range(2)] == [one[i] for i in range(2)]    # the first source's groups are unchanged
    assert set(both[2].positions[1:]) <= set(range(50, 60)) and set(both[3].positions[1:]) <= set(range(60, 70))
    twice = _groups(sampler, [bm25, bm25], per_query=True)                # the control: one source twice
    assert twice[0].positions[1:] != twice[2].positions[1:]               # drawn again, not the same group
    skip = _groups(sampler, [{"q2": ["p20"]}, {"q2": ["p60"]}], without_negatives="skip")
    assert skip.skipped_queries == ["q1"] and len(skip) == 2
    skip = _groups(sampler, [{"q2": ["p20"]}, {"q1": ["p30"], "q2": ["p60"]}], per_query=True, without_negatives="skip")
    assert skip.skipped_queries == [] and [group.query for group in skip] == ["second query", "first query",
                                                                             "second query"]


@pytest.mark.parametrize("sampler", ["retromae", "tevatron"])
def test_negatives_read_as_positions_give_the_same_groups_as_ids(sampler, tmp_path):
    """negative_positions: the compact table a large negatives file is read into (ids the corpus lacks and
    queries not asked for are dropped) samples the same groups as the ids themselves."""
    from reprolib.data.groups import negative_positions

    path = tmp_path / "negatives.tsv"
    path.write_text("q1\t" + ",".join(f"p{i}" for i in range(10, 40)) + ",p999\nq2\tp50,p51,p52\nq9\tp60\n")
    table = negative_positions(path, ListCorpus(100), qids={"q1", "q2"})
    assert sorted(table) == ["q1", "q2"] and table["q1"].dtype == np.int32 and len(table["q1"]) == 30
    by_id = _groups(sampler, {"q1": [f"p{i}" for i in range(10, 40)], "q2": ["p50", "p51", "p52"]}, group_size=6)
    by_position = _groups(sampler, table, group_size=6)
    for epoch in range(3):
        by_id.set_epoch(epoch)
        by_position.set_epoch(epoch)
        assert [by_id[i] for i in range(len(by_id))] == [by_position[i] for i in range(len(by_position))]


def test_teacher_table_reads_text_and_pickles_alike(tmp_path, monkeypatch):
    """teacher_table: the compact form training groups hold teacher scores in, from either file format, text
    listed query by query or not; a plain pickle is streamed, one of numpy scalars (which the streaming reader
    does not parse) is loaded whole."""
    import gzip
    import pickle

    from reprolib.data import formats
    from reprolib.data.groups import teacher_table

    scores = {"1": {"p3": 2.5, "p4": -1.0, "p999": 0.5}, "2": {"p7": 0.25}, "3": {"p1": 1.0}}
    text, apart = tmp_path / "scores.tsv", tmp_path / "apart.tsv"
    lines = [f"{q}\t{p}\t{v}\n" for q, hits in scores.items() for p, v in hits.items()]
    text.write_text("".join(lines))
    apart.write_text("".join(lines[1:] + lines[:1]))          # query 1's lines apart
    tables = [teacher_table(path, ListCorpus(100), qids={"1", "2"}) for path in (text, apart)]
    whole = formats.load_scores_pickle
    for name, value in (("plain.pkl.gz", float), ("numpy.pkl.gz", np.float32)):
        with gzip.open(tmp_path / name, "wb") as f:
            pickle.dump({int(q): {p: value(v) for p, v in hits.items()} for q, hits in scores.items()}, f)
        if name.startswith("plain"):   # streamed: loading it whole is not allowed here
            monkeypatch.setattr(formats, "load_scores_pickle", lambda path: pytest.fail("loaded whole"))
        tables.append(teacher_table(tmp_path / name, ListCorpus(100), qids={"1", "2"}))
        monkeypatch.setattr(formats, "load_scores_pickle", whole)
    for table in tables:
        assert sorted(table) == ["1", "2"]                       # q3 not asked for; p999 not in the corpus
        assert sorted(zip(*[column.tolist() for column in table["1"]])) == [(3, 2.5), (4, -1.0)]
        assert table["1"][0].dtype == np.int32 and table["1"][1].dtype == np.float32


def test_groups_reject_bad_options_and_data():
    with pytest.raises(ReprolibError, match="unknown negative sampler"):
        _groups("random", {})
    with pytest.raises(ReprolibError, match="no training examples"):
        TrainGroups(ListCorpus(5), {"q": "x"}, {"q": {"p99": 1}}, {})


def test_config_rejects_unknown_and_missing_options(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nout_dir: o\ntrain_data: d\nlearning_rat: 1\n")
    with pytest.raises(ReprolibError, match=r"bad.yaml: unknown training option\(s\) learning_rat"):
        TrainConfig.from_yaml(path)
    path.write_text("model: m\n")
    with pytest.raises(ReprolibError, match="missing training option"):
        TrainConfig.from_yaml(path)


def test_config_from_a_notebooks_parameters(tmp_path):
    """A notebook builds its config from its parameters (globals()): options by name, nothing else."""
    import math

    from reprolib.data import Corpus   # noqa: F401  (a class in globals is not an option)

    namespace = {"model": "scratch:micro", "out_dir": tmp_path / "out", "train_data": "d", "batch_size": 8,
                 "learning_rate": "2e-5", "num_processes": 2, "math": math, "corpus": object(), "plots": None}
    config = TrainConfig.from_params(namespace, objective="retromae")
    assert (config.model, config.out_dir, config.batch_size, config.objective) == \
        ("scratch:micro", str(tmp_path / "out"), 8, "retromae")
    assert config.learning_rate == 2e-5 and config.corpus is None      # typed; a non-option value is ignored
    with pytest.raises(ReprolibError, match="notebook parameters: batch_size must be"):
        TrainConfig.from_params({**namespace, "batch_size": 0})


def _config(synthetic_dir, out_dir, **overrides):
    options = dict(model="scratch:micro", out_dir=str(out_dir), train_data=str(synthetic_dir), group_size=4,
                   batch_size=8, max_steps=6, learning_rate=1e-3, pooling="mean", normalize=True,
                   temperature=0.05, query_max_len=24, passage_max_len=64, progress=False, tensorboard=False)
    options.update(overrides)
    return TrainConfig(**options)


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_train_writes_model_log_and_summary_then_skips(synthetic_dir, tmp_path):
    config = _config(synthetic_dir, tmp_path / "run", max_steps=None, epochs=1, batch_size=32, log_steps=5,
                     model="scratch:tiny", learning_rate=5e-4, tensorboard=True)
    summary = train(config, log=lambda *_: None)
    rows = read_log(tmp_path / "run" / "train_log.csv")
    assert summary["steps"] == 2000 // 32 and rows[-1]["step"] == summary["steps"]
    assert rows[-1]["loss"] < rows[0]["loss"]             # it learns, even in one short epoch
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    from reprolib.modeling import DenseEncoder
    encoder = DenseEncoder.from_pretrained(tmp_path / "run" / "model")
    assert encoder.pooling == "mean" and encoder.normalize
    assert (tmp_path / "run" / "model" / "modules.json").exists()
    messages = []
    train(config, log=messages.append)
    assert "skipping" in messages[0]


def test_resume_continues_with_the_same_data_order(synthetic_dir, tmp_path):
    straight = _config(synthetic_dir, tmp_path / "straight", save_steps=3)
    train(straight, log=lambda *_: None)
    # Interrupted after step 3: only the step-3 checkpoint survives; the rerun must land on the same weights.
    resumed_dir = tmp_path / "resumed"
    resumed = _config(synthetic_dir, resumed_dir, save_steps=3)
    train(resumed, log=lambda *_: None)
    for name in ("model", SUMMARY_FILE):
        path = resumed_dir / name
        (os.remove(path) if path.is_file() else shutil.rmtree(path))
    messages = []
    summary = train(resumed, log=messages.append)
    assert summary["resumed_from_step"] == 3 and any("resuming from" in m for m in messages)
    a, b = _weights(tmp_path / "straight" / "model"), _weights(resumed_dir / "model")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_log(resumed_dir / "train_log.csv")] == list(range(1, 7))


def test_resume_refuses_a_checkpoint_from_another_config(synthetic_dir, tmp_path):
    train(_config(synthetic_dir, tmp_path / "run", save_steps=3), log=lambda *_: None)
    os.remove(tmp_path / "run" / SUMMARY_FILE)
    with pytest.raises(ReprolibError, match="different training config"):
        train(_config(synthetic_dir, tmp_path / "run", save_steps=3, learning_rate=5e-4), log=lambda *_: None)


def test_resume_refuses_a_checkpoint_trained_in_another_precision(synthetic_dir, tmp_path):
    """mixed_precision "auto" is hashed unresolved: a run moved from a bf16 machine to one without native bf16 has
    the same digest, but its checkpoint must not be continued in float32."""
    config = _config(synthetic_dir, tmp_path / "run", save_steps=3, mixed_precision="auto")
    train(config, log=lambda *_: None)
    os.remove(tmp_path / "run" / SUMMARY_FILE)
    state_file = sorted((tmp_path / "run" / "checkpoints").glob("*/trainer_state.json"))[-1]
    state = json.loads(state_file.read_text())
    here = state["precision"]
    state["precision"] = "bf16" if here == "no" else "no"   # as written on another kind of machine
    state_file.write_text(json.dumps(state))
    names = {"no": "float32"}
    then, now = names.get(state["precision"], state["precision"]), names.get(here, here)
    with pytest.raises(ReprolibError, match=f"trained in {then}, but mixed_precision auto is {now} on this machine"):
        train(config, log=lambda *_: None)
    del state["precision"]                                   # written before precisions were recorded: trusted
    state_file.write_text(json.dumps(state))
    assert train(config, log=lambda *_: None)["resumed_from_step"] == 3


def test_new_input_at_the_same_path_trains_again(synthetic_dir, tmp_path):
    """Negatives mined again (or a teacher rescored) into the same file: another training. A finished one is trained
    again, its checkpoints dropped; a killed one is not resumed on the new input."""
    lines = (synthetic_dir / "train.negatives.tsv").read_text().splitlines()
    negatives = tmp_path / "negatives.tsv"
    negatives.write_text("".join(line + "\n" for line in lines))
    config = _config(synthetic_dir, tmp_path / "run", negatives=str(negatives), save_steps=3)
    train(config, log=lambda *_: None)
    first = _weights(tmp_path / "run" / "model")
    killed = _config(synthetic_dir, tmp_path / "killed", negatives=str(negatives), save_steps=3)
    train(killed, log=lambda *_: None)
    os.remove(tmp_path / "killed" / SUMMARY_FILE)   # as if killed after its last checkpoint

    shallow = [f"{qid}\t{','.join(pids.split(',')[:3])}\n" for qid, pids in (line.split("\t") for line in lines)]
    negatives.write_text("".join(shallow))     # mined again, 3 deep
    messages = []
    summary = train(config, log=messages.append)
    assert any("training again" in m for m in messages) and summary["resumed_from_step"] == 0
    second = _weights(tmp_path / "run" / "model")
    assert any(not torch.equal(first[key], second[key]) for key in first)
    with pytest.raises(ReprolibError, match="input files"):
        train(killed, log=lambda *_: None)
    assert run_digest(config, 1) != run_digest(config, 2)   # another world size: another global batch


def test_runs_recorded_before_input_files_are_skipped_and_resumed_as_then(synthetic_dir, tmp_path):
    """A summary or checkpoint written before run digests has its config's digest only: the same config is the same
    training, as it was then (no finished model is trained again, no killed run restarted, by an upgrade)."""
    config = _config(synthetic_dir, tmp_path / "run", save_steps=3)
    train(config, log=lambda *_: None)
    for path in [tmp_path / "run" / SUMMARY_FILE, *(tmp_path / "run" / "checkpoints").glob("*/trainer_state.json")]:
        record = json.loads(path.read_text())
        del record["run_digest"]
        path.write_text(json.dumps(record))
    messages = []
    train(config, log=messages.append)
    assert "skipping" in messages[0]
    os.remove(tmp_path / "run" / SUMMARY_FILE)   # as if killed after the step-3 checkpoint
    assert train(config, log=lambda *_: None)["resumed_from_step"] == 3


def test_run_digest_reads_through_links_and_past_bookkeeping(tmp_path):
    real = tmp_path / "real_qrels"
    real.mkdir()
    (real / "train.tsv").write_text("q1\t0\tp1\t1\n")
    data = tmp_path / "data"   # as link_local makes a dataset folder: a link to a folder of qrels
    data.mkdir()
    (data / "qrels").symlink_to(real, target_is_directory=True)
    (data / "corpus.tsv").write_text("p1\tt\ttext\n")
    config = TrainConfig(model="scratch:micro", out_dir=str(data / "run"), train_data=str(data))
    before = run_digest(config, 1)
    from reprolib.kernels import KERNEL_LOG
    from reprolib.pipeline import METRICS, PARAMS   # the bookkeeping's names where they are written
    for name in (METRICS, PARAMS, KERNEL_LOG, "lengths.png", "00_prepare_data.ipynb",
                 ".ipynb_checkpoints/00_prepare_data-checkpoint.ipynb", "run/train_log.csv"):
        (data / name).parent.mkdir(exist_ok=True)
        (data / name).write_text("written beside the data, not read by the training")
    assert run_digest(config, 1) == before
    (real / "train.tsv").write_text("q1\t0\tp2\t1\n")   # seen through the link
    assert run_digest(config, 1) != before


def test_data_prepared_again_to_the_same_files_is_the_same_input(tmp_path):
    from reprolib.data.prepare import prepare_synthetic

    data = tmp_path / "data"
    prepare_synthetic(data, num_passages=1000, progress=False)
    config = TrainConfig(model="scratch:micro", out_dir=str(tmp_path / "run"), train_data=str(data))
    before = run_digest(config, 1)
    prepare_synthetic(data, num_passages=1000, progress=False)   # notebook 00 run again by hand
    assert run_digest(config, 1) == before
    prepare_synthetic(data, num_passages=1000, seed=7, progress=False)
    assert run_digest(config, 1) != before


def test_a_resumed_log_is_its_own_file_never_another_runs_through_a_link(tmp_path):
    """train_log.csv is rewritten up to the resumed step, then appended to: with a run folder copied as hard links
    (cp -al), appending to the kept file would write into the other run's log."""
    from reprolib.training import _Logger

    first, copy = tmp_path / "first", tmp_path / "copy"
    log = _Logger(first, ["step", "loss"], tensorboard=False)
    log.write(step=10, loss=1.5)
    log.close()
    copy.mkdir()
    os.link(first / "train_log.csv", copy / "train_log.csv")
    before = (first / "train_log.csv").read_text()
    log = _Logger(copy, ["step", "loss"], resume_step=10, tensorboard=False)   # the same rows: the same bytes
    log.write(step=20, loss=1.0)
    log.close()
    assert (first / "train_log.csv").read_text() == before
    assert [row["step"] for row in read_log(copy / "train_log.csv")] == [10, 20]


def test_run_digest_stamps_the_t5_a_scaled_spec_reads(tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "model.safetensors").write_text("weights")
    config = TrainConfig(model=f"t5-scaled:{t5}", out_dir=str(tmp_path / "run"), train_data=str(tmp_path / "data"))
    before = run_digest(config, 1)
    (t5 / "model.safetensors").write_text("weights trained again")
    assert run_digest(config, 1) != before


@pytest.mark.slow
def test_launch_two_cpu_processes_from_python(synthetic_dir, tmp_path):
    """What a notebook does for multi-GPU training: `accelerate launch` in a subprocess, log streamed back."""
    lines = []
    config = _config(synthetic_dir, tmp_path / "run", max_steps=3, cross_device=True)
    summary = launch(config, num_processes=2, log=lines.append)
    assert summary["processes"] == 2 and summary["global_batch"] == 16
    assert any("on 2 process(es)" in line for line in lines)
    assert json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())["steps"] == 3


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _on_two_machines(run_on_machine, timeout=900):
    """Call run_on_machine(machine_rank) for ranks 0 and 1 at once (two "machines" on localhost). Processes they
    start that wait on each other forever (a regression) are killed after `timeout` seconds, so that the test fails
    instead of hanging."""
    from concurrent.futures import ThreadPoolExecutor, wait

    import psutil   # accelerate's own dependency

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run_on_machine, rank) for rank in (0, 1)]
        if wait(futures, timeout=timeout).not_done:
            started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
            for child in started:
                try:
                    child.kill()
                except psutil.NoSuchProcess:   # a worker whose peer was just killed may have exited already
                    pass
            psutil.wait_procs(started, timeout=30)
            raise TimeoutError(f"the two machines were still running after {timeout} s: killed")
        return [future.result() for future in futures]


def _micro_init(synthetic_dir, out_dir):
    """One scratch:micro BERT on disk, the same start for runs in different folders."""
    from reprolib.data import Corpus
    from reprolib.modeling.specs import resolve_model

    return Path(resolve_model("scratch:micro", Corpus.open(synthetic_dir, progress=False), out_dir, seed=0))


@pytest.mark.slow
def test_two_machines_on_localhost_train_like_one_process_with_the_same_global_batch(synthetic_dir, tmp_path):
    """2 machines x 2 gloo processes (machine ranks 0 and 1 on 127.0.0.1), cross-device negatives and the loss
    scaled by the world size, against 1 process with the 4x batch: the same global batches and gradients, so
    the same weights. Without dropout (`dropout: 0.0`): its draws depend on how the batch is split over the
    processes. Machine 0 writes the model and the summary; machine 1's launch returns None."""
    init = _micro_init(synthetic_dir, tmp_path / "init")
    options = dict(model=str(init), max_steps=3, cross_device=True, scale_loss_by_world_size=True, dropout=0.0)
    train(_config(synthetic_dir, tmp_path / "single", batch_size=8, **options), log=lambda *_: None)
    spread = _config(synthetic_dir, tmp_path / "machines", batch_size=2, **options)
    port = _free_port()
    logs = {0: [], 1: []}
    summaries = _on_two_machines(lambda rank: launch(
        spread, num_processes=4, log=logs[rank].append, num_machines=2, machine_rank=rank,
        main_process_ip="127.0.0.1", main_process_port=port))
    assert summaries[1] is None, logs[1]
    assert summaries[0]["processes"] == 4 and summaries[0]["global_batch"] == 8, logs[0]
    single, machines = _weights(tmp_path / "single" / "model"), _weights(tmp_path / "machines" / "model")
    for key in single:
        torch.testing.assert_close(machines[key], single[key], rtol=1e-4, atol=1e-5)
    # and the same losses logged: the ×W is the gradient's, not the logged value's
    logged = {run: [row["loss"] for row in read_log(tmp_path / run / "train_log.csv")] for run in ("single", "machines")}
    assert len(logged["single"]) == 3
    np.testing.assert_allclose(logged["machines"], logged["single"], rtol=1e-4)


@pytest.mark.slow
def test_a_resume_on_machines_that_cannot_all_read_the_checkpoint_stops_with_a_clear_error(synthetic_dir, tmp_path):
    """Two machines, each with out_dir on its own disk (here: two folders). The main process's machine holds the
    checkpoint; the other machine's process must not start again from step 0 while the main one resumes."""
    init = _micro_init(synthetic_dir, tmp_path / "init")
    own_disk = {rank: _config(synthetic_dir, tmp_path / f"machine{rank}", model=str(init), max_steps=4, save_steps=2,
                              batch_size=4) for rank in (0, 1)}

    def run(rank, port):
        return launch(own_disk[rank], num_processes=2, log=lambda *_: None, num_machines=2, machine_rank=rank,
                      main_process_ip="127.0.0.1", main_process_port=port)

    port = _free_port()
    _on_two_machines(lambda rank: run(rank, port))
    assert (tmp_path / "machine0" / "checkpoints" / "step-0000002" / "trainer_state.json").exists()
    assert not (tmp_path / "machine1" / "checkpoints" / "step-0000002" / "trainer_state.json").exists()
    (tmp_path / "machine0" / SUMMARY_FILE).unlink()   # as if stopped after step 2: it resumes from the checkpoint
    for stale in (False, True):   # no checkpoint on machine 1's disk, or one of another training at that step
        if stale:
            state = tmp_path / "machine1" / "checkpoints" / "step-0000002" / "trainer_state.json"
            state.write_text(json.dumps({"step": 2, "run_digest": "another training"}))
        port = _free_port()
        with pytest.raises(ReprolibError, match="process\\(es\\) 1 cannot read the checkpoint .*out_dir must be on "):
            _on_two_machines(lambda rank: run(rank, port))


SHARD_RANKS = """import json, sys
from pathlib import Path
from reprolib.data import Corpus
from reprolib.index import encode_corpus, process_state
from reprolib.modeling import DenseEncoder

model, corpus, out = sys.argv[1:4]
state = process_state()
shards = list(range(state.process_index, 5, state.num_processes))     # the shards this process will write
Path(out + ".ranks").mkdir(exist_ok=True)
(Path(out + ".ranks") / str(state.process_index)).write_text(json.dumps(shards))
encode_corpus(DenseEncoder.from_pretrained(model), Corpus.open(corpus, progress=False), out, shard_size=400,
              progress=False, state=state)
"""


@pytest.mark.slow
def test_two_machines_on_localhost_encode_each_shard_once(synthetic_dir, tmp_path):
    """Sharded encoding over 2 machines x 2 processes: the four global ranks split the 5 shards among them, each
    shard written by one process, and the index equals the one a single process builds."""
    import subprocess
    import sys

    from reprolib.data import Corpus
    from reprolib.index import encode_corpus
    from reprolib.modeling import DenseEncoder
    from reprolib.training import accelerate_command

    model = _micro_init(synthetic_dir, tmp_path / "model")
    single = tmp_path / "single"
    encode_corpus(DenseEncoder.from_pretrained(model), Corpus.open(synthetic_dir, progress=False), single,
                  shard_size=400, progress=False)
    script = tmp_path / "encode.py"
    script.write_text(SHARD_RANKS)
    port, spread = _free_port(), tmp_path / "machines"

    def run_on_machine(rank):
        command = accelerate_command(4, num_machines=2, machine_rank=rank, main_process_ip="127.0.0.1",
                                     main_process_port=port)
        done = subprocess.run(command + [str(script), str(model), str(synthetic_dir), str(spread)],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr

    _on_two_machines(run_on_machine)
    assigned = [json.loads((tmp_path / "machines.ranks" / str(rank)).read_text()) for rank in range(4)]
    assert sorted(shard for shards in assigned for shard in shards) == [0, 1, 2, 3, 4]   # each once, none missing
    assert json.loads((spread / "index.json").read_text())["complete"]
    vectors = [np.concatenate([np.load(p) for p in sorted(index.glob("shard_*.npy"))]) for index in (spread, single)]
    assert len(list(spread.glob("shard_*.npy"))) == 5
    np.testing.assert_array_equal(*vectors)


def test_bf16_grad_accumulation_and_checkpointing_train_on_the_cpu(synthetic_dir, tmp_path):
    config = _config(synthetic_dir, tmp_path / "run", max_steps=None, epochs=1, batch_size=100, grad_accum=4,
                     mixed_precision="bf16", gradient_checkpointing=True)
    summary = train(config, log=lambda *_: None)
    rows = read_log(tmp_path / "run" / "train_log.csv")
    assert summary["steps"] == 2000 // (100 * 4) and summary["global_batch"] == 400
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_sparse_objective_adds_flops_of_queries_and_passages_to_the_cross_entropy(synthetic_dir, tmp_path):
    from reprolib.modeling import SparseEncoder, load_encoder

    config = _config(synthetic_dir, tmp_path / "sparse", objective="sparse", pooling=None, normalize=None,
                     temperature=1.0, max_steps=3, flops_passage_weight=0.01)
    assert config.flops_query_weight == pytest.approx(0.0075)      # λ_q = 0.75 λ_d unless given
    summary = train(config, log=lambda *_: None)
    assert summary["objective"] == "sparse"
    for row in read_log(tmp_path / "sparse" / "train_log.csv"):
        assert row["loss"] == pytest.approx(row["ranking_loss"] + 0.0075 * row["flops_query"]
                                            + 0.01 * row["flops_passage"], rel=1e-5)
        assert row["flops_query"] > 0 and row["flops_passage"] > 0
    assert isinstance(load_encoder(tmp_path / "sparse" / "model"), SparseEncoder)


def test_dev_evaluation_keeps_the_best_model(synthetic_dir, tmp_path, monkeypatch):
    """docs/recipes.md correction 4: evaluate every N steps, keep the checkpoint of the best dev metric."""
    import reprolib.dev_eval

    scores = iter([0.30, 0.50, 0.40])       # the dev metric at steps 2, 4 and 6: step 4 is the best
    monkeypatch.setattr(reprolib.dev_eval.DevEval, "__call__", lambda self, encoder: next(scores))
    best_run = _config(synthetic_dir, tmp_path / "best", eval_steps=2, eval_max_queries=20, keep="best")
    summary = train(best_run, log=lambda *_: None)
    assert summary["best_step"] == 4 and summary["best_dev_RR@10"] == 0.50 and summary["kept"] == "best"
    assert (tmp_path / "best" / "dev_eval.csv").read_text().splitlines() == ["step,RR@10", "2,0.3", "4,0.5", "6,0.4"]
    assert _weights(tmp_path / "best" / "model").keys() == _weights(tmp_path / "best" / "best").keys()
    for name, tensor in _weights(tmp_path / "best" / "model").items():
        assert torch.equal(tensor, _weights(tmp_path / "best" / "best")[name])
    last = train(_config(synthetic_dir, tmp_path / "last", max_steps=6), log=lambda *_: None)
    assert last["steps"] == 6
    assert any(not torch.equal(t, _weights(tmp_path / "last" / "model")[n])   # the best is not the last
               for n, t in _weights(tmp_path / "best" / "model").items())


def test_dev_evaluation_measures_the_retriever(synthetic_dir, synthetic_corpus, tmp_path):
    """Exact search and a rerank of the same candidates agree; a trained model scores above chance."""
    from reprolib.data.formats import write_run
    from reprolib.dev_eval import DevEval
    from reprolib.modeling import DenseEncoder

    config = _config(synthetic_dir, tmp_path / "run", max_steps=30, eval_max_queries=50)
    train(config, log=lambda *_: None)
    encoder = DenseEncoder.from_pretrained(tmp_path / "run" / "model")
    exact = DevEval(config, synthetic_corpus)
    pids = [synthetic_corpus.id(i) for i in range(len(synthetic_corpus))]
    write_run(tmp_path / "all.trec", {q: {p: -i for i, p in enumerate(pids)} for q in exact.queries})
    rerank = DevEval(dataclasses.replace(config, eval_candidates=str(tmp_path / "all.trec"),
                                         eval_depth=len(pids)), synthetic_corpus)
    value = exact(encoder)
    assert value == pytest.approx(rerank(encoder)) and value > 0.05
    with pytest.raises(ReprolibError, match="keep: best needs dev evaluations"):
        dataclasses.replace(config, keep="best").check()


def test_group_accuracy_of_groups_without_negatives_is_nan_not_a_crash(synthetic_dir, synthetic_corpus, tmp_path):
    """group_size 1 (in-batch negatives only): the notebooks' before/after group accuracy has nothing to count."""
    from reprolib.objectives import group_accuracy, load_encoder, load_groups, score_groups

    assert group_accuracy([0.9, 0.1], [0.5, 0.2, 0.3, 0.0]) == 0.5
    config = _config(synthetic_dir, tmp_path / "run", model=str(_micro_init(synthetic_dir, tmp_path / "init")),
                     group_size=1)
    encoder = load_encoder(config, synthetic_corpus)
    positives, negatives = score_groups(encoder, load_groups(config, encoder.sep_token), num_groups=8)
    assert len(positives) == 8 and len(negatives) == 0
    assert np.isnan(group_accuracy(positives, negatives))


def test_exact_dev_search_keeps_as_many_hits_as_a_rerank_scores(synthetic_dir, synthetic_corpus, tmp_path, caplog):
    """R@1000 (or any metric past 100) by exact search is computed on `eval_depth` hits, as a rerank of the whole
    corpus computes it; a candidates run that misses queries is said, one that misses them all refused."""
    from reprolib.data.formats import write_run
    from reprolib.dev_eval import DevEval
    from reprolib.modeling import DenseEncoder

    encoder = DenseEncoder.from_pretrained(_micro_init(synthetic_dir, tmp_path / "init"))
    config = _config(synthetic_dir, tmp_path / "run", eval_max_queries=20, eval_metric="R@1000",
                     eval_depth=len(synthetic_corpus))
    exact = DevEval(config, synthetic_corpus)
    pids = [synthetic_corpus.id(i) for i in range(len(synthetic_corpus))]
    qids = list(exact.queries)
    for name, ranked in (("all", qids), ("most", qids[1:])):
        write_run(tmp_path / f"{name}.trec", {q: {p: -i for i, p in enumerate(pids)} for q in ranked})
    rerank = DevEval(dataclasses.replace(config, eval_candidates=str(tmp_path / "all.trec")), synthetic_corpus)
    assert len(synthetic_corpus) > 1000 and exact(encoder) == pytest.approx(rerank(encoder))
    DevEval(dataclasses.replace(config, eval_candidates=str(tmp_path / "most.trec")), synthetic_corpus)
    assert "ranks no passage for 1 of the 20" in caplog.text
    write_run(tmp_path / "other.trec", {"other": {pids[0]: 1.0}})
    with pytest.raises(ReprolibError, match="ranks no passage of the corpus for any"):
        DevEval(dataclasses.replace(config, eval_candidates=str(tmp_path / "other.trec")), synthetic_corpus)


def test_a_resume_continues_the_dev_log_and_best_of_its_checkpoint(tmp_path):
    """A crash after step 6's evaluation, resumed from step 4's checkpoint: step 6 is evaluated again, so its row
    goes; a best/.partial complete when the crash came (dev_eval.json is written last) is the best, an incomplete one
    is not."""
    from reprolib.training import _resume_dev

    def model(folder, step, value):
        folder.mkdir()
        (folder / "weights").write_text(f"step {step}")
        if value is not None:
            (folder / "dev_eval.json").write_text(json.dumps({"step": step, "metric": "RR@10", "value": value}))

    (tmp_path / "dev_eval.csv").write_text("step,RR@10\n2,0.1\n4,0.3\n6,0.2\n")
    model(tmp_path / "best", 2, 0.1)
    model(tmp_path / "best.partial", 4, 0.3)   # stopped before it replaced best/
    assert _resume_dev(tmp_path, 4) == {"step": 4, "metric": "RR@10", "value": 0.3}
    assert (tmp_path / "best" / "weights").read_text() == "step 4" and not (tmp_path / "best.partial").exists()
    assert (tmp_path / "dev_eval.csv").read_text().splitlines() == ["step,RR@10", "2,0.1", "4,0.3"]
    model(tmp_path / "best.partial", 6, None)  # stopped while it was saved
    assert _resume_dev(tmp_path, 4)["step"] == 4 and not (tmp_path / "best.partial").exists()


def test_a_new_run_does_not_take_an_earlier_runs_best(synthetic_dir, tmp_path, monkeypatch):
    """best/ and dev_eval.csv left by another config in the same out_dir are cleared, not continued."""
    import reprolib.dev_eval

    scores = iter([0.9, 0.1, 0.2, 0.3])
    monkeypatch.setattr(reprolib.dev_eval.DevEval, "__call__", lambda self, encoder: next(scores))
    train(_config(synthetic_dir, tmp_path / "run", max_steps=2, eval_steps=2, eval_max_queries=20, keep="best"),
          log=lambda *_: None)
    summary = train(_config(synthetic_dir, tmp_path / "run", max_steps=6, eval_steps=2, eval_max_queries=20,
                            keep="best", learning_rate=2e-3), log=lambda *_: None)
    assert summary["best_step"] == 6 and summary["best_dev_RR@10"] == 0.3       # not the other run's 0.9
    assert (tmp_path / "run" / "dev_eval.csv").read_text().splitlines() == ["step,RR@10", "2,0.1", "4,0.2", "6,0.3"]


@pytest.mark.parametrize("option", [{"dropout": 0.0}, {"bottleneck_layer_norm": True}, {"nsp_loss_weight": 1.0},
                                    {"encoder_learning_rate": 0.0}, {"exact_match": True}])
def test_options_added_later_change_the_digest_only_when_set(synthetic_dir, tmp_path, option):
    """Unset, an option added later leaves the digest as it was before the option existed: a run trained then is
    not trained again."""
    import hashlib

    base = _config(synthetic_dir, tmp_path / "run")
    assert _config(synthetic_dir, tmp_path / "run", **option).digest() != base.digest()
    old = dataclasses.asdict(base)
    for key in ("out_dir", "save_steps", "save_total_limit", "log_steps", "tensorboard", "progress", "dropout",
                "bottleneck_layer_norm", "nsp_loss_weight", "encoder_learning_rate", "exact_match"):
        old.pop(key)
    assert base.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(ReprolibError, match="dropout must be in"):
        TrainConfig.from_dict({**dataclasses.asdict(base), "dropout": 1.0})


@pytest.mark.parametrize("objective", ["contrastive", "sparse", "cross_encoder", "retromae", "lexmae"])
def test_dropout_option_reaches_the_model_of_every_objective(synthetic_dir, tmp_path, objective):
    from torch import nn

    from reprolib.data import Corpus
    from reprolib.objectives import build_objective

    corpus = Corpus.open(synthetic_dir, progress=False)
    for dropout in (None, 0.0):
        config = _config(synthetic_dir, tmp_path / str(dropout), objective=objective, dropout=dropout)
        rates = [m.p for m in build_objective(config, corpus).model.modules() if isinstance(m, nn.Dropout)]
        if dropout is None:
            assert any(rate > 0 for rate in rates), (objective, rates)      # the checkpoint's own 0.1
        else:
            assert rates and all(rate == 0 for rate in rates), (objective, rates)


def test_bottleneck_layer_norm_option_reaches_the_lexmae_model(synthetic_dir, tmp_path):
    from reprolib.data import Corpus
    from reprolib.objectives import build_objective

    corpus = Corpus.open(synthetic_dir, progress=False)
    for option in (False, True):
        config = _config(synthetic_dir, tmp_path / str(option), objective="lexmae", bottleneck_layer_norm=option)
        assert build_objective(config, corpus).model.bottleneck_layer_norm is option


def test_an_interrupted_launch_stops_its_workers(tmp_path, monkeypatch):
    """A stage interrupted (Ctrl-C, kill) while `accelerate launch` trains: its workers must not train on, orphaned."""
    import sys

    pid_file = tmp_path / "pid"
    worker = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n" \
             "while True:\n    print('step', flush=True)\n    time.sleep(0.1)"
    monkeypatch.setattr("reprolib.training.accelerate_command", lambda *a, **k: [sys.executable, "-c", worker])

    def interrupted(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        launch(tmp_path / "config.yaml", num_processes=2, log=interrupted)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
