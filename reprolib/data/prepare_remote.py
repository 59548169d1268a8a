"""Download and lay out the real datasets: MS MARCO passage (RocketQA package), sentence-transformers'
MS MARCO hard negatives, BEIR and LoTTE.

Every function writes into `out_dir` in the layout the readers auto-detect, and is idempotent
and resumable: downloads resume, each output file is written atomically and skipped when it
already exists, and `prepared.json` is written last, so a second call returns at once.
Archives are kept in `download_dir` (default `out_dir/downloads`); pass a shared one to avoid
fetching LoTTE's multi-GB archive once per domain.
"""
import json
import re
import shutil
from pathlib import Path

from reprolib.data.download import download, extract
from reprolib.data.sbert_negatives import write_ce_margin_negatives, write_union_negatives
from reprolib.errors import DataError, ReprolibError
from reprolib.fileio import atomic_write, iter_lines, split_fields

MARKER = "prepared.json"

ROCKETQA_URL = "https://rocketqa.bj.bcebos.com/corpus/marco.tar.gz"
QRELS_TRAIN_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking/qrels.train.tsv"
TRIPLES_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking/qidpidtriples.train.full.2.tsv.gz"
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
LOTTE_URL = "https://downloads.cs.stanford.edu/nlp/data/colbert/colbertv2/lotte.tar.gz"
SBERT_HF = "https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main"
HARD_NEGATIVES_URL = f"{SBERT_HF}/msmarco-hard-negatives.jsonl.gz"
CE_SCORES_URL = f"{SBERT_HF}/cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"

# md5 of each public BEIR zip, from the table in beir-cellar/beir README.md at commit ef83d29
# ("Available Datasets"). They apply to the default BEIR_URL only.
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}

LOTTE_DOMAINS = ("writing", "recreation", "science", "technology", "lifestyle", "pooled")
LOTTE_SPLITS = ("dev", "test")

REMOTE_NAMES = "msmarco-passage, msmarco-hard-negatives, msmarco-passage+hard-negatives, beir/<name> or lotte/<domain>/<split>"


class UnknownDataset(ReprolibError):
    """A dataset name that none of the downloaders knows."""


def prepare(name, out_dir, **options):
    """Prepare dataset `name` into `out_dir`; `options` go to the matching prepare_* function."""
    parts = name.split("/")
    if name == "msmarco-passage":
        return prepare_msmarco_passage(out_dir, **options)
    if name == "msmarco-hard-negatives":
        return prepare_msmarco_hard_negatives(out_dir, **options)
    if name == "msmarco-passage+hard-negatives":   # one data stage for the recipes that train on both
        sbert = {key: options.pop(key) for key in ("negatives_url", "scores_url") if key in options}
        downloads = options.pop("download_dir", None) or Path(out_dir) / "downloads"
        out = prepare_msmarco_passage(out_dir, download_dir=downloads, **options)
        prepare_msmarco_hard_negatives(Path(out_dir) / "hard-negatives", download_dir=downloads,
                                       progress=options.get("progress", True), **sbert)
        return out
    if parts[0] == "beir" and len(parts) == 2:
        return prepare_beir(parts[1], out_dir, **options)
    if parts[0] == "lotte" and len(parts) == 3:
        return prepare_lotte(parts[1], parts[2], out_dir, **options)
    raise UnknownDataset(f"unknown dataset {name!r}: expected {REMOTE_NAMES}")


# ---------------------------------------------------------------------------------------------
# Completion marker
# ---------------------------------------------------------------------------------------------
def _is_prepared(out_dir, dataset):
    """True when `out_dir` already holds `dataset`; an error when it holds a different one."""
    marker = Path(out_dir) / MARKER
    if not marker.exists():
        return False
    try:
        found = json.loads(marker.read_text(encoding="utf-8")).get("dataset")
    except (ValueError, AttributeError):
        raise DataError(marker, None, "not a valid marker file; delete it to prepare the directory again") from None
    if found != dataset:
        raise ReprolibError(f"{out_dir} already holds dataset {found!r}, not {dataset!r}; choose another directory")
    return True


def _write_marker(out_dir, dataset, sources, files):
    counts = {name: _count_lines(Path(out_dir) / name) for name in files}
    with atomic_write(Path(out_dir) / MARKER) as f:
        json.dump({"dataset": dataset, "sources": sources, "lines": counts}, f, indent=2)
        f.write("\n")


def _count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# ---------------------------------------------------------------------------------------------
# MS MARCO passage
# ---------------------------------------------------------------------------------------------
def prepare_msmarco_passage(out_dir, rocketqa_url=ROCKETQA_URL, qrels_train_url=QRELS_TRAIN_URL,
                            triples_url=TRIPLES_URL, download_dir=None, progress=True):
    """MS MARCO passage in MS MARCO layout: the RocketQA corpus with titles, queries, qrels and
    BM25 negatives, built as RetroMAE / OpenMatch / Tevatron v1's get_data scripts do."""
    dataset = "msmarco-passage"
    out_dir = Path(out_dir)
    if _is_prepared(out_dir, dataset):
        return out_dir
    downloads = Path(download_dir) if download_dir else out_dir / "downloads"

    from_rocketqa = ["corpus.tsv", "train.query.txt", "dev.query.txt", "qrels.dev.tsv"]
    if not all((out_dir / name).exists() for name in from_rocketqa):
        marco = downloads / "marco"
        if not marco.exists():
            extract(download(rocketqa_url, downloads / "marco.tar.gz", progress=progress), marco, prefix="marco/")
        if not (out_dir / "corpus.tsv").exists():
            join_corpus(marco / "para.txt", marco / "para.title.txt", out_dir / "corpus.tsv")
        for name in ("train.query.txt", "dev.query.txt"):
            if not (out_dir / name).exists():
                with open(marco / name, "rb") as src, atomic_write(out_dir / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        if not (out_dir / "qrels.dev.tsv").exists():
            normalize_qrels(marco / "qrels.dev.tsv", out_dir / "qrels.dev.tsv")
        shutil.rmtree(marco)  # ~3 GB duplicate of what is now in out_dir; the archive is kept

    # The official train qrels replace RocketQA's copy, as all three recipes do.
    if not (out_dir / "qrels.train.tsv").exists():
        normalize_qrels(download(qrels_train_url, downloads / "qrels.train.tsv", progress=progress),
                        out_dir / "qrels.train.tsv")
    if not (out_dir / "train.negatives.tsv").exists():
        convert_triples_to_negatives(download(triples_url, downloads / "qidpidtriples.train.full.2.tsv.gz", progress=progress),
                                     out_dir / "train.negatives.tsv")

    sources = {"rocketqa": rocketqa_url, "qrels_train": qrels_train_url, "triples": triples_url}
    _write_marker(out_dir, dataset, sources, from_rocketqa + ["qrels.train.tsv", "train.negatives.tsv"])
    return out_dir


def _pid(path, number, value):
    if not (value.isascii() and value.isdigit()):
        raise DataError(path, number, f"pid must be a non-negative integer, found {value[:40]!r}")
    return int(value)


def _titles(path):
    """Yield (pid, title, line number) from `pid \\t title` lines, checking pids strictly increase."""
    last = -1
    for number, line in iter_lines(path):
        fields = split_fields(path, number, line, (1, 2))
        pid = _pid(path, number, fields[0])
        if pid <= last:
            raise DataError(path, number, f"pid {pid} after pid {last}: titles must be sorted by pid, without repeats")
        last = pid
        yield pid, fields[1] if len(fields) == 2 else "", number


def join_corpus(para_path, title_path, out_path):
    """Write `pid \\t title \\t text` lines: a merge-join of two files sorted by pid, streamed.

    Passage pids must be exactly 0..N-1 in order (OpenMatch and Tevatron index rows by position).
    A passage without a title gets an empty one; a title without a passage is an error.
    """
    titles = _titles(title_path)
    title = next(titles, None)  # invariant: None or a pid >= the current passage's
    with atomic_write(out_path) as out:
        for expected, (number, line) in enumerate(iter_lines(para_path)):
            pid_text, text = split_fields(para_path, number, line, (2,))
            pid = _pid(para_path, number, pid_text)
            if pid != expected:
                raise DataError(para_path, number, f"pid {pid} where {expected} was expected: pids must be 0..N-1, contiguous and sorted")
            if title is not None and title[0] == pid:
                out.write(f"{pid}\t{title[1]}\t{text}\n")
                title = next(titles, None)
            else:
                out.write(f"{pid}\t\t{text}\n")
        if title is not None:
            raise DataError(title_path, title[2], f"title for pid {title[0]}, which has no passage")


def normalize_qrels(src, out_path):
    """Write qrels as TREC `qid \\t 0 \\t pid \\t rel` from 2-column `qid pid` or 4-column input."""
    with atomic_write(out_path) as out:
        for number, line in iter_lines(src):
            fields = split_fields(src, number, line, (2, 4), sep=None)
            qid, pid, rel = (fields[0], fields[1], "1") if len(fields) == 2 else (fields[0], fields[2], fields[3])
            out.write(f"{qid}\t0\t{pid}\t{rel}\n")


def convert_triples_to_negatives(triples_path, out_path):
    """Group consecutive `qid \\t pos \\t neg` lines by qid into `qid \\t neg1,neg2,...`.

    Negatives keep their first-seen order and repeats within a group are dropped. Only one group is
    held in memory, so the 400M-line triples file streams through.
    """
    qid, negatives = None, {}  # a dict is an ordered set
    with atomic_write(out_path) as out:
        for number, line in iter_lines(triples_path):
            q, _positive, negative = split_fields(triples_path, number, line, (3,))
            if q != qid:
                if qid is not None:
                    out.write(f"{qid}\t{','.join(negatives)}\n")
                qid, negatives = q, {}
            negatives[negative] = None
        if qid is not None:
            out.write(f"{qid}\t{','.join(negatives)}\n")


# ---------------------------------------------------------------------------------------------
# sentence-transformers' MS MARCO hard negatives
# ---------------------------------------------------------------------------------------------
def prepare_msmarco_hard_negatives(out_dir, negatives_url=HARD_NEGATIVES_URL, scores_url=CE_SCORES_URL,
                                   download_dir=None, progress=True):
    """Negatives and teacher scores for MS MARCO train queries, to pair with msmarco-passage (no corpus here):

    train.negatives.union.tsv      every system's negatives minus positives (Disentangled-Retriever)
    train.negatives.ce_margin.tsv  cross-encoder margin 3, 5 per system (RetroMAE's BEIR model)
    train.ce_scores.pkl.gz         the cross-encoder scores pickle as published, for `read_scores`

    See `reprolib.data.sbert_negatives` for the two recipes and their sources.
    """
    dataset = "msmarco-hard-negatives"
    out_dir = Path(out_dir)
    if _is_prepared(out_dir, dataset):
        return out_dir
    downloads = Path(download_dir) if download_dir else out_dir / "downloads"
    union, ce_margin = out_dir / "train.negatives.union.tsv", out_dir / "train.negatives.ce_margin.tsv"

    # Downloaded straight to its final name: an output as well as an input, and ~1 GB not worth a copy.
    scores = download(scores_url, out_dir / "train.ce_scores.pkl.gz", progress=progress)
    if not (union.exists() and ce_margin.exists()):
        negatives = download(negatives_url, downloads / "msmarco-hard-negatives.jsonl.gz", progress=progress)
        if not union.exists():
            write_union_negatives(negatives, union)
        if not ce_margin.exists():
            write_ce_margin_negatives(negatives, scores, ce_margin)

    _write_marker(out_dir, dataset, {"negatives": negatives_url, "scores": scores_url}, [union.name, ce_margin.name])
    return out_dir


# ---------------------------------------------------------------------------------------------
# BEIR and LoTTE: unpack the published files unchanged
# ---------------------------------------------------------------------------------------------
def prepare_beir(name, out_dir, url=None, md5=None, download_dir=None, progress=True):
    """BEIR dataset `name` (e.g. scifact) in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ReprolibError(f"invalid BEIR dataset name {name!r}")
    dataset = f"beir/{name}"
    out_dir = Path(out_dir)
    if _is_prepared(out_dir, dataset):
        return out_dir
    if url is None:
        url, md5 = BEIR_URL.format(name=name), md5 or BEIR_MD5.get(name)
    downloads = Path(download_dir) if download_dir else out_dir / "downloads"
    extract(download(url, downloads / f"{name}.zip", md5=md5, progress=progress), out_dir, prefix=f"{name}/")
    _write_marker(out_dir, dataset, {"url": url, "md5": md5}, _data_files(out_dir))
    return out_dir


def prepare_lotte(domain, split, out_dir, url=LOTTE_URL, download_dir=None, progress=True):
    """LoTTE `domain`/`split` as shipped: collection.tsv, questions.{search,forum}.tsv, qas.{search,forum}.jsonl."""
    if domain not in LOTTE_DOMAINS:
        raise ReprolibError(f"unknown LoTTE domain {domain!r}: expected one of {', '.join(LOTTE_DOMAINS)}")
    if split not in LOTTE_SPLITS:
        raise ReprolibError(f"unknown LoTTE split {split!r}: expected one of {', '.join(LOTTE_SPLITS)}")
    dataset = f"lotte/{domain}/{split}"
    out_dir = Path(out_dir)
    if _is_prepared(out_dir, dataset):
        return out_dir
    downloads = Path(download_dir) if download_dir else out_dir / "downloads"
    extract(download(url, downloads / "lotte.tar.gz", progress=progress), out_dir, prefix=f"lotte/{domain}/{split}/")
    _write_marker(out_dir, dataset, {"url": url}, _data_files(out_dir))
    return out_dir


def _data_files(out_dir):
    """The .jsonl / .tsv files under `out_dir` (archives in downloads/ are .zip / .tar.gz), relative."""
    return sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".tsv"))
