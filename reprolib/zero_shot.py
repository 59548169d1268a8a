"""Zero-shot evaluation of one retriever on many datasets (BEIR, LoTTE, local folders), as in BEIR
(Thakur et al. 2021): the model never trains on the target data; each corpus is encoded, searched and
scored on its own, and the benchmark number is the mean over the datasets.

Dataset entries
    "beir/<name>"                  prepared into <data_dir>/beir/<name>; queries of the given `split`
    "lotte/<domain>/<split>"       prepared into <data_dir>/lotte/<domain>/<split>; LoTTE ships two query
                                   sets per split, "search" (the default) and "forum"
    a dataset directory            read where it is
    Any entry may end in "@<query set>" ("lotte/technology/test@forum", "beir/msmarco@dev") to choose
    its queries. The short name (the dataset's key in the metrics and its folder under out_dir) is the
    BEIR name or the folder's name, plus "-<query set>" when one is named; LoTTE names always carry it
    ("lotte-technology-test-search").

A dataset with no corpus of its own but sub-folders that have one (BEIR's CQADupStack: 12 StackExchange
forums) is evaluated forum by forum and scored by the mean over the forums, as BEIR reports it.

Under out_dir/<name>/ (per forum: out_dir/<name>/<forum>/) each dataset gets index/ (resumable encoding)
and run.trec. out_dir/<name>/results.json records the settings before the encoding starts and the metrics
once they are known: a rerun with the same settings skips a scored dataset, and a rerun with another model
stops instead of searching that model's queries in the old index.
"""
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from reprolib.errors import ReprolibError
from reprolib.fileio import atomic_write

LOTTE_QUERY_SETS = ("search", "forum")
RESULTS = "results.json"
AVERAGE = "average"
ENCODING_KEYS = ("model", "template", "passage_max_len")  # what the saved index depends on
QUERY_SET = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Dataset:
    name: str    # short name: metric key prefix and folder under out_dir
    source: str  # a name that reprolib.data.prepare knows, or a dataset directory
    split: str   # the query set evaluated


@dataclass(frozen=True)
class Settings:
    """What a dataset's results depend on; saved with them, so that a rerun knows whether they still hold."""
    model: str
    metrics: str = "nDCG@10 R@100"
    ignore_identical_ids: bool = True
    template: str = "plain"
    passage_max_len: int | None = None   # None: the model's own
    query_max_len: int | None = None
    topk: int = 1000


def parse_dataset(entry, split="test"):
    """The Dataset an entry names (see the module doc); `split`: the query set of non-LoTTE entries."""
    source, query_set = entry, None
    head, at, tail = entry.rpartition("@")
    if at and QUERY_SET.fullmatch(tail) and not Path(entry).is_dir():   # an "@" in a folder's path is its own
        source, query_set = head, tail
    parts = source.split("/")
    source = _resolved(source)   # a folder named relatively or absolutely is one dataset, its results reused
    if Path(source).is_dir():
        name = Path(source).name.replace("@", "-")   # "@" names a metric's cutoff in its results' keys
    elif parts[0] == "beir" and len(parts) == 2:
        name = parts[1]
    elif parts[0] == "lotte" and len(parts) == 3:
        name, query_set = f"lotte-{parts[1]}-{parts[2]}", query_set or "search"
        if query_set not in LOTTE_QUERY_SETS:
            raise ReprolibError(f"{entry!r}: LoTTE's query sets are {' and '.join(LOTTE_QUERY_SETS)}, "
                                f"not {query_set!r}")
    else:
        raise ReprolibError(f"unknown dataset {entry!r}: expected beir/<name>, lotte/<domain>/<split>[@search|@forum] "
                            "or a dataset directory (not found)")
    return Dataset(f"{name}-{query_set}" if query_set else name, source, query_set or split)


def parse_datasets(entries, split="test"):
    """Datasets for a list of entries (or one whitespace-separated string); short names must be unique."""
    if isinstance(entries, str):
        entries = entries.split()
    datasets = [parse_dataset(str(entry), split) for entry in entries]
    names = [d.name for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ReprolibError(f"several entries have the short name {repeated[0]!r}; their results would share "
                            "one folder: list each dataset once, or rename a dataset folder")
    if not datasets:
        raise ReprolibError("no dataset given")
    return datasets


def dataset_dir(dataset, data_dir, progress=True):
    """The directory holding `dataset`: a local one as it is, a named one prepared under `data_dir`.

    Archives go to data_dir/downloads, shared by all datasets, so that LoTTE's archive is fetched once
    for every domain. Preparing an already prepared dataset returns at once.
    """
    if Path(dataset.source).is_dir():
        return Path(dataset.source)
    from reprolib.data.prepare import prepare

    target = Path(data_dir) / dataset.source
    prepare(dataset.source, target, progress=progress, download_dir=Path(data_dir) / "downloads")
    return target


def subsets(directory):
    """[directory] when it holds a corpus, else its sub-folders that do (CQADupStack's forums), by name."""
    from reprolib.data.layout import find_corpus_file

    directory = Path(directory)
    if _has_corpus(directory):
        return [directory]
    found = sorted(p for p in directory.iterdir() if p.is_dir() and _has_corpus(p))
    if not found:
        find_corpus_file(directory)  # raises, naming the directory and the files it looked for
    return found


def _has_corpus(directory):
    from reprolib.data.layout import CORPUS_NAMES

    return any((directory / name).is_file() for name in CORPUS_NAMES)


def drops_identical_ids(directory):
    """Whether BEIR's identical-id rule applies: to BEIR-layout datasets (corpus.jsonl), where a query
    can be a corpus document under the same id (ArguAna, Quora). LoTTE and MS MARCO layouts number
    queries and passages separately from 0, so there an equal id is a coincidence, not the same text."""
    from reprolib.data.layout import find_corpus_file

    return find_corpus_file(directory).name.startswith("corpus.jsonl")


def retrieve_and_evaluate(encoder, directory, split, out_dir, settings, batch_size=128, progress=True):
    """Encode one corpus into out_dir/index, search its `split` queries, write out_dir/run.trec; returns
    {"metrics", "passages", "queries", "seconds"}."""
    from reprolib import index
    from reprolib.data import Corpus, find_qrels_file, read_qrels, write_run
    from reprolib.data.layout import load_queries
    from reprolib.metrics import evaluate
    from reprolib.search import search_index

    started = time.perf_counter()
    out_dir = Path(out_dir)
    corpus = Corpus.open(directory, progress=progress)
    queries = load_queries(directory, split)
    qrels = read_qrels(find_qrels_file(directory, split))
    index.encode_corpus(encoder, corpus, out_dir / "index", batch_size=batch_size, template=settings.template,
                        max_length=settings.passage_max_len, progress=progress)
    run = search_index(encoder, queries, out_dir / "index", corpus, topk=settings.topk, batch_size=batch_size,
                       max_length=settings.query_max_len, progress=progress)
    write_run(out_dir / "run.trec", run, tag="zero-shot")
    # "ranked": BEIR averages over the queries pytrec_eval returns, those in both the run and the qrels
    result = evaluate(run, qrels, settings.metrics, denominator="ranked",
                      ignore_identical_ids=settings.ignore_identical_ids and drops_identical_ids(directory))
    return {"metrics": result.aggregate, "passages": len(corpus), "queries": len(queries),
            "seconds": round(time.perf_counter() - started, 2)}


def evaluate_dataset(encoder, dataset, data_dir, out_dir, settings, batch_size=128, progress=True):
    """The results of `encoder` on `dataset`: read from out_dir/<name>/results.json when saved there with
    the same settings, else prepared, encoded, searched, scored and saved. A dataset of several forums
    scores the mean over them (each forum's own results are kept under "subsets")."""
    from reprolib.index import model_fingerprint

    folder, fingerprint = Path(out_dir) / dataset.name, model_fingerprint(encoder)
    saved = load_results(folder, dataset, settings, fingerprint)
    if saved:
        return saved
    results = {"dataset": dataset.source, "split": dataset.split, "settings": asdict(settings),
               "model_fingerprint": fingerprint}
    _write_json(folder / RESULTS, results)  # the settings go first: they name what the index will hold
    parts = subsets(dataset_dir(dataset, data_dir, progress=progress))
    single = len(parts) == 1
    found = {part.name: retrieve_and_evaluate(encoder, part, dataset.split, folder if single else folder / part.name,
                                              settings, batch_size=batch_size, progress=progress)
             for part in parts}
    results["metrics"] = _mean([r["metrics"] for r in found.values()])
    results.update({key: sum(r[key] for r in found.values()) for key in ("passages", "queries", "seconds")})
    if not single:
        results["subsets"] = found
    _write_json(folder / RESULTS, results)
    return results


def _write_json(path, data):
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)


def load_results(folder, dataset, settings, fingerprint=None):
    """The results saved in folder/results.json for this dataset, split, settings and model (`fingerprint`: its
    weights and settings, so a model retrained at the same path is evaluated again), else None (also while they are
    not complete). Settings of another model (or template, or max length) are an error: the index beside them was
    encoded with it."""
    path = Path(folder) / RESULTS
    if not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    before = saved["settings"]
    changed = [key for key in ENCODING_KEYS if before.get(key) != getattr(settings, key)]
    if changed:
        was = ", ".join(f"{key}={before.get(key)!r}" for key in changed)
        raise ReprolibError(f"{folder} holds an index encoded with another {' and '.join(changed)} ({was}); "
                            "use a fresh out_dir or delete that folder")
    same = (saved["split"] == dataset.split and _resolved(saved.get("dataset")) == dataset.source
            and saved.get("model_fingerprint") == fingerprint and before == asdict(settings))
    return saved if same and "metrics" in saved else None


def _resolved(source):
    """A dataset folder as its absolute path (also one saved relatively, before 2026-12-06); a name unchanged."""
    return str(Path(source).resolve()) if source and Path(source).is_dir() else source


def _mean(rows):
    return {name: math.fsum(row[name] for row in rows) / len(rows) for name in rows[0]}


def summarize(results):
    """{name: {metric: value}} of every dataset's results ({name: results}), then "average": the mean
    over the datasets of each metric (BEIR's benchmark number)."""
    rows = {name: r["metrics"] for name, r in results.items()}
    return {**rows, AVERAGE: _mean(list(rows.values()))} if rows else {}


def flat_metrics(rows):
    """{"<name>_<metric>": value}, e.g. scifact_nDCG@10 and average_nDCG@10, for save_metrics."""
    return {f"{name}_{metric}": value for name, row in rows.items() for metric, value in row.items()}


def results_table(results):
    """A markdown table: one row per dataset (passages, queries, metrics, seconds), then the average."""
    from reprolib.report import markdown_table

    rows = summarize(results)
    metrics = list(rows.get(AVERAGE, {}))
    lines = [[name, r["split"], f"{r['passages']:,}", f"{r['queries']:,}"] + [f"{r['metrics'][m]:.4f}" for m in metrics]
             + [f"{r['seconds']:.1f}"] for name, r in results.items()]
    if rows:
        lines.append([f"**{AVERAGE}**", "", "", ""] + [f"**{rows[AVERAGE][m]:.4f}**" for m in metrics] + [""])
    return markdown_table(["dataset", "split", "passages", "queries"] + metrics + ["seconds"], lines)
