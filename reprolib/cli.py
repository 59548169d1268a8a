"""The `reprolib` command. Every verb exits 2 with one line `error: ...` on bad input."""
import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from reprolib import __version__
from reprolib.data.templates import TEMPLATES
from reprolib.errors import ReprolibError
from reprolib.objectives import OBJECTIVES


def cmd_run(args):
    from reprolib.bundle import pipeline_path
    from reprolib.pipeline import plan_pipeline, run_pipeline
    options = dict(out_root=args.out, sets=args.set, from_stage=args.from_stage, only=args.only, force=args.force,
                   seeds=args.seeds)
    if not args.plan:
        run_pipeline(pipeline_path(args.params), jobs=args.jobs, **options)
        return
    plan = plan_pipeline(pipeline_path(args.params), **options)
    width = max(len(sid) for sid, _, _ in plan)
    for sid, action, why in plan:
        print(f"{action:<6}  {sid:<{width}}  {why}")


@contextlib.contextmanager
def _terminate_as_interrupt():
    """`kill PID` (SIGTERM) stops a verb as Ctrl-C does: a pipeline's running stages are interrupted and recorded as
    such and their kernels stopped; any verb says what it kept and exits 130. It is the way to stop a command started
    with `&` from a script, whose shell has set SIGINT to be ignored."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIG_IGN: whoever started us wants it ignored. LOCAL_RANK: a worker of `accelerate launch` (torchrun), which
    # stops its workers with SIGTERM, and one stuck in a collective whose peer died would never see a Python handler
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN or "LOCAL_RANK" in os.environ:
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def job_count(text):
    """`--jobs 2` -> 2."""
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of stages, at least 1, got {text!r}")
    return jobs


def seed_list(text):
    """`--seeds 1,2,3` -> [1, 2, 3]."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


def _parsed(text, cast, expected):
    """`cast(text)`, or the argparse error saying what was expected."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text):
    """A count that must be at least 1 (--topk, --batch-size, --depth, ...): 0 and negatives are refused, not
    read as "all" or as a Python slice."""
    value = _parsed(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def scale_fraction(text):
    """A number in (0, 1]."""
    value = _parsed(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def non_negative_float(text):
    """A finite float >= 0 (BM25's k1)."""
    value = _parsed(text, float, "a number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def unit_float(text):
    """A float in [0, 1] (BM25's b)."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _check_outputs(args, inputs=("corpus", "queries", "run", "qrels", "negatives", "model", "index")):
    """--out must not be one of the command's inputs: writing it would replace what is being read."""
    out = getattr(args, "out", None)
    if not out:
        return
    target = Path(out).resolve()
    for name in inputs:
        value = getattr(args, name, None)
        if value and Path(value).exists() and Path(value).resolve() == target:
            raise ReprolibError(f"--out {out} is also the --{name} input; choose another output path")


def cmd_notebooks(args):
    from reprolib.bundle import copy_course
    copied = copy_course(args.dest, force=args.force)
    print(f"copied {len(copied)} files into {args.dest}/notebooks and {args.dest}/params; "
          f"run one with: cd {args.dest} && reprolib run params/quickstart.yaml")


def cmd_status(args):
    from reprolib.pipeline import format_status
    print(format_status(args.run_dir))


def cmd_prepare(args):
    from reprolib.data.prepare import prepare
    if args.name == "synthetic":
        options = dict(num_passages=args.num_passages, seed=args.seed)
    elif args.name == "synthetic-msmarco":
        options = dict(scale=args.scale, seed=args.seed)
    else:
        options = dict(_key_value(item) for item in args.url)
    prepare(args.name, args.out, **options)
    print(f"prepared {args.name} in {args.out}")


def _key_value(item):
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ReprolibError(f"--url expects KEY=URL (e.g. url=https://host/scifact.zip), got {item!r}")
    return key, value


def cmd_validate(args):
    from reprolib.data.validate import validate_dataset
    for line in validate_dataset(args.dataset, drop_missing_qrels=args.drop_missing_qrels):
        print(line)


def cmd_bm25(args):
    from reprolib.data import Corpus, write_run
    from reprolib.data.layout import load_queries
    from reprolib.search import bm25_search
    queries = load_queries(args.queries, args.split)  # small: check it before the corpus store is built
    corpus = Corpus.open(args.corpus)
    run = bm25_search(corpus, queries, topk=args.topk, k1=args.k1, b=args.b, template=args.template)
    write_run(args.out, run, tag="bm25")
    print(f"wrote {sum(len(h) for h in run.values())} hits for {len(run)} queries to {args.out}")


def cmd_encode(args):
    from reprolib.data import Corpus
    from reprolib.data.templates import get_template
    from reprolib.index import encode_corpus, process_state
    from reprolib.modeling.encoder import autocast
    get_template(args.template)  # a bad name fails before the model loads
    state = process_state()  # one process, or one per device under `accelerate launch`
    precision = autocast(args.precision, state.device)
    with state.main_process_first():  # the first open builds the corpus store: once, by the main process
        corpus = Corpus.open(args.corpus, progress=state.is_main_process)
    encoder = _load_encoder(args.model, state.device)
    with precision:
        meta = encode_corpus(encoder, corpus, args.out, shard_size=args.shard_size, batch_size=args.batch_size,
                             template=args.template, dtype=args.dtype, max_length=args.max_len, state=state)
    if state.is_main_process:
        if meta["kind"] == "sparse":
            shape = f"sparse, vocabulary {meta['dim']}, {meta['nonzeros_per_passage']['mean']} non-zeros per passage"
        else:
            shape = f"dim {meta['dim']}, {meta['dtype']}"
        print(f"encoded {meta['num_passages']} passages into {meta['num_shards']} shards ({shape}) in {args.out}")


def cmd_search(args):
    from reprolib.data import Corpus, write_run
    from reprolib.data.layout import load_queries
    from reprolib.index import load_meta, process_state, require_faiss
    from reprolib.search import dense_search, sparse_search
    state = process_state()
    meta = load_meta(args.index)
    # under `accelerate launch` an exact dense search splits the shards over the processes; other searches run
    # on the main process alone
    if not state.is_main_process and (meta["kind"] != "dense" or args.index_type != "flat"):
        return
    queries = load_queries(args.queries, args.split)
    store = meta.get("corpus_store")
    if not store or not Path(store, "ids.npy").exists():
        raise ReprolibError(f"the corpus store {store} that the index {args.index} was built from is gone "
                            "(cache cleared?); re-run reprolib encode")
    kind = meta["kind"]
    if kind == "sparse" and args.index_type != "flat":
        raise ReprolibError(f"--index-type {args.index_type} is for dense indexes; {args.index} is sparse "
                            "(searched exactly)")
    if kind == "dense" and args.quantized:
        raise ReprolibError(f"--quantized is for sparse indexes; {args.index} is dense")
    if kind == "dense":
        require_faiss()   # before the queries are encoded: a missing faiss is said at once
    corpus = Corpus(store)
    encoder = _load_encoder(args.model, state.device)
    if encoder.kind != kind:
        raise ReprolibError(f"{args.index} is a {kind} index, but {args.model} is a {encoder.kind} encoder")
    options = dict(topk=args.topk, batch_size=args.batch_size, max_length=args.max_len, progress=state.is_main_process)
    if kind == "sparse":
        run = sparse_search(encoder, queries, args.index, corpus, quantize=args.quantized, **options)
        tag = "sparse-quantized" if args.quantized else "sparse"
    else:
        run = dense_search(encoder, queries, args.index, corpus, index_type=args.index_type, state=state, **options)
        tag = f"dense-{args.index_type}"
    if not state.is_main_process:
        return
    write_run(args.out, run, tag=tag)
    split = f" ({meta['num_shards']} shards split over {state.num_processes} processes)" \
        if kind == "dense" and args.index_type == "flat" and state.num_processes > 1 else ""
    print(f"wrote {sum(len(h) for h in run.values())} hits for {len(run)} queries to {args.out}{split}")


def _load_encoder(model, device, load=None):
    """The model folder's encoder (dense, or sparse when saved as one; or whatever `load(model)` returns) on
    `device`, with the model's own settings (as notebooks load it); --max-len overrides its max lengths per call."""
    from safetensors import SafetensorError

    from reprolib.modeling import load_encoder
    if model.startswith((".", "/")) and not Path(model).exists():
        raise ReprolibError(f"{model}: model folder not found")
    try:
        encoder = (load or load_encoder)(model)
    except (OSError, ValueError, SafetensorError) as e:  # transformers' "not found" / "not a model", damaged weights
        raise ReprolibError(f"cannot load model {model}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") \
            from None
    return encoder.to(device)


def cmd_evaluate(args):
    from reprolib.data import read_qrels, read_run
    from reprolib.data.layout import find_qrels_file
    from reprolib.metrics import evaluate, format_table
    run = read_run(args.run)
    qrels = read_qrels(find_qrels_file(args.qrels, args.split))
    options = dict(metrics=args.metrics, denominator=args.denominator, ignore_identical_ids=args.ignore_identical_ids)
    result = evaluate(run, qrels, **options)
    if not args.compare:
        print(json.dumps(result.aggregate, indent=2) if args.json else format_table(result.aggregate))
        return
    from reprolib.metrics import paired_test
    other = evaluate(read_run(args.compare), qrels, **options)
    tests = {name: paired_test(result.per_query[name], other.per_query[name]) for name in result.aggregate}
    if args.json:
        print(json.dumps(tests, indent=2))
        return
    print(f"{'metric':10s} {'run':>8s} {'compare':>8s} {'diff':>8s} {'p(t)':>8s} {'p(rand)':>8s}")
    for name, t in tests.items():
        print(f"{name:10s} {t['mean_a']:8.4f} {t['mean_b']:8.4f} {t['diff']:+8.4f} {t['p_ttest']:8.4f} {t['p_randomization']:8.4f}")


def cmd_mine(args):
    import itertools

    from reprolib.data import read_qrels, read_run, write_negatives
    from reprolib.data.formats import NotGrouped, iter_run
    from reprolib.data.layout import find_qrels_file
    from reprolib.search import iter_mined_negatives, mine_negatives
    run = iter_run(args.run)
    first = next(run)   # a missing or empty run is said before the qrels are read
    qrels = read_qrels(find_qrels_file(args.qrels, args.split))
    options = dict(depth=args.depth, num=args.num, shuffle_seed=args.shuffle_seed)
    try:   # query by query: a mined top-200 of MS MARCO's train queries is 100M lines
        written = write_negatives(args.out, iter_mined_negatives(itertools.chain([first], run), qrels, **options))
    except NotGrouped:   # a run that lists a query's hits apart: read it whole (nothing was written)
        written = write_negatives(args.out, mine_negatives(read_run(args.run), qrels, **options))
    print(f"wrote negatives for {written} queries to {args.out}")


def cmd_rerank(args):
    from reprolib.data import Corpus, read_run, write_run
    from reprolib.data.formats import check_doc_ids
    from reprolib.data.layout import load_queries
    from reprolib.modeling.encoder import autocast
    from reprolib.rerank import rerank
    from reprolib.search import top_hits
    queries = load_queries(args.queries, args.split)
    run = read_run(args.run)
    corpus = Corpus.open(args.corpus)
    check_doc_ids(args.run, top_hits(run, args.depth), corpus)   # the passages it will score, named before loading
    cross_encoder = _load_cross_encoder(args.model, args.max_len)
    with autocast(args.precision, cross_encoder.device):
        reranked = rerank(cross_encoder, run, corpus, queries, depth=args.depth,
                          template=args.template, batch_size=args.batch_size)
    write_run(args.out, reranked, tag="cross-encoder")
    print(f"reranked the top {args.depth} of {len(reranked)} queries into {args.out}")


def cmd_score(args):
    from reprolib.data import Corpus, read_qrels
    from reprolib.data.layout import find_qrels_file, load_queries
    from reprolib.modeling.encoder import autocast
    from reprolib.rerank import TeacherPairs, iter_candidates, write_teacher_scores
    queries = load_queries(args.queries, args.split)
    candidates = args.run or args.negatives
    next(iter_candidates(candidates), None)   # a missing or malformed file is said before the model loads
    pairs = TeacherPairs(read_qrels(find_qrels_file(args.qrels, args.split)), candidates, depth=args.depth)
    cross_encoder = _load_cross_encoder(args.model, args.max_len)
    with autocast(args.precision, cross_encoder.device):
        written = write_teacher_scores(cross_encoder, pairs, Corpus.open(args.corpus), queries, args.out,
                                       template=args.template, batch_size=args.batch_size)
    print(f"wrote {written['pairs']} teacher scores for {written['queries']} queries to {args.out}")


def _load_cross_encoder(model, max_len):
    from reprolib.index import process_state
    from reprolib.modeling.cross_encoder import CrossEncoder
    return _load_encoder(model, process_state().device, lambda name: CrossEncoder.from_pretrained(name, max_len=max_len))


def cmd_train(args):
    from reprolib.training import TrainConfig, train
    # several processes or machines: train() runs `accelerate launch`, whose workers run this verb with one each
    train(TrainConfig.from_yaml(args.config), args.num_processes, num_machines=args.num_machines,
          machine_rank=args.machine_rank, main_process_ip=args.main_process_ip, main_process_port=args.main_process_port)


TEMPLATE_NAMES = ", ".join(TEMPLATES)


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows an option's default, unless it has none or its help text already tells it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line, like every other error, and shows defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = _Parser(prog="reprolib", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reprolib {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    p = verbs.add_parser("run", help="run a pipeline YAML (stages of notebooks) into outputs/")
    p.add_argument("params", help="a pipeline YAML, or the name of a shipped one: quickstart, miniature/retromae, "
                                  "retromae_finetune_msmarco, ... (the files under params/)")
    p.add_argument("--out", default="outputs", help="output root (default: outputs)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="override one stage parameter (a YAML value), e.g. --set finetune.epochs=2; repeatable")
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and every later one")
    p.add_argument("--only", metavar="STAGE", help="rerun just this stage")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--plan", action="store_true",
                   help="print what each stage would do (skip, resume, rerun) and why; run nothing")
    p.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                   help="run the seeded stages once per seed (replaces the YAML's seeds); checks use the mean")
    p.add_argument("--jobs", type=job_count, default=1, metavar="N",
                   help="run up to N stages at once, sharing the cores (default 1); on a GPU machine keep 1")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("notebooks", help="copy the shipped notebooks/ and params/ into a folder (for students)")
    p.add_argument("dest", help="the folder to create or fill")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist there")
    p.set_defaults(func=cmd_notebooks)

    p = verbs.add_parser("status", help="show the stages of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)

    data = verbs.add_parser("data", help="prepare or validate datasets").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("prepare", help="synthetic | synthetic-msmarco | msmarco-passage | msmarco-hard-negatives | "
                                        "beir/<name> | lotte/<domain>/<split>")
    p.add_argument("name")
    p.add_argument("--out", required=True)
    p.add_argument("--num-passages", type=positive_int, default=5000, help="synthetic only")
    p.add_argument("--scale", type=scale_fraction, default=1.0,
                   help="synthetic-msmarco only: the share of MS MARCO's sizes (default 1: 8.8M passages)")
    p.add_argument("--seed", type=int, default=42, help="synthetic and synthetic-msmarco")
    p.add_argument("--url", action="append", default=[], metavar="KEY=URL",
                   help="override a download URL: url= for beir/lotte; rocketqa_url=, qrels_train_url=, triples_url= for msmarco-passage; "
                        "negatives_url=, scores_url= for msmarco-hard-negatives")
    p.set_defaults(func=cmd_prepare)
    p = data.add_parser("validate", help="check every file of a dataset directory (ids, formats, encodings)")
    p.add_argument("dataset")
    p.add_argument("--drop-missing-qrels", action="store_true",
                   help="rewrite qrels without rows whose doc is not in the corpus, and report how many")
    p.set_defaults(func=cmd_validate)

    p = verbs.add_parser("bm25", help="BM25 retrieval (Lucene's BM25) into a TREC run")
    p.add_argument("--corpus", required=True, help="corpus file or dataset directory")
    p.add_argument("--queries", required=True, help="queries file or dataset directory")
    p.add_argument("--split", help="split when --queries is a directory (default: dev, else test)")
    p.add_argument("--out", required=True)
    p.add_argument("--topk", type=positive_int, default=1000, help="hits kept per query")
    p.add_argument("--k1", type=non_negative_float, default=1.5, help="BM25 term-frequency saturation")
    p.add_argument("--b", type=unit_float, default=0.75, help="BM25 length normalisation")
    p.add_argument("--template", default="plain", help=f"passage text template: {TEMPLATE_NAMES}")
    p.set_defaults(func=cmd_bm25)

    p = verbs.add_parser("encode", help="encode a corpus into a sharded dense or sparse index, as the model is "
                                        "(resumable; multi-GPU under `accelerate launch -m reprolib encode`)")
    p.add_argument("--model", required=True, help="HF name or folder (HF, sentence-transformers or reprolib)")
    p.add_argument("--corpus", required=True, help="corpus file or dataset directory")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--batch-size", type=positive_int, default=64, help="passages per forward pass")
    p.add_argument("--max-len", type=positive_int, help="passage max length (default: the model's reprolib or sentence-transformers "
                                               "config, else 128; sparse: 144)")
    _precision_arguments(p)
    p.add_argument("--template", default="plain", help=f"passage text template: {TEMPLATE_NAMES}")
    p.add_argument("--shard-size", type=positive_int, default=100_000, help="passages per shard file")
    p.add_argument("--dtype", choices=["float16", "float32"],
                   help="stored vector type (default: float16 for dense models; sparse ones store float32 only)")
    p.set_defaults(func=cmd_encode)

    p = verbs.add_parser("search", help="dense or sparse retrieval over an index built by `reprolib encode`, "
                                        "into a TREC run")
    p.add_argument("--model", required=True, help="the query encoder (the model the index was built with)")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--queries", required=True, help="queries file or dataset directory")
    p.add_argument("--split", help="split when --queries is a directory (default: dev, else test)")
    p.add_argument("--out", required=True)
    p.add_argument("--topk", type=positive_int, default=1000, help="hits kept per query")
    p.add_argument("--index-type", choices=["flat", "hnsw", "ivfpq"], default="flat",
                   help="dense indexes. flat: exact; hnsw / ivfpq: approximate, built on first use and kept in the "
                        "index directory")
    p.add_argument("--quantized", action="store_true",
                   help="sparse indexes: score Anserini's integer impacts round(100 w) instead of the float weights")
    p.add_argument("--batch-size", type=positive_int, default=64, help="queries per forward pass")
    p.add_argument("--max-len", type=positive_int, help="query max length (default: the model's reprolib or sentence-transformers "
                                               "config, else 32)")
    p.set_defaults(func=cmd_search)

    p = verbs.add_parser("evaluate", help="evaluate a TREC run (trec_eval semantics via ir_measures)")
    p.add_argument("run")
    p.add_argument("qrels", help="qrels file or dataset directory")
    p.add_argument("--split")
    p.add_argument("--metrics", default="RR@10 R@1000 nDCG@10",
                   help="space-separated: RR@k, R@k, nDCG@k, P@k, AP, Success@k, or trec_eval names (ndcg_cut.10)")
    p.add_argument("--denominator", choices=["judged", "ranked"], default="judged",
                   help="average over every judged query (MS MARCO) or only the ranked ones (trec_eval default)")
    p.add_argument("--ignore-identical-ids", action="store_true", help="drop hits whose doc id equals the query id (BEIR)")
    p.add_argument("--compare", metavar="RUN2", help="paired significance test of RUN2 against RUN, per metric")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("mine-negatives", help="top-D of a run minus positives, in rank order")
    p.add_argument("--run", required=True)
    p.add_argument("--qrels", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=positive_int, default=200, help="top hits of the run considered per query")
    p.add_argument("--num", type=positive_int, default=None, help="keep at most this many per query")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle each query's negatives before --num (Tevatron/OpenMatch build_hn); default: rank order")
    p.set_defaults(func=cmd_mine)

    p = verbs.add_parser("rerank", help="rescore the top-D hits of a run with a cross-encoder")
    _cross_encoder_arguments(p)
    p.add_argument("--run", required=True, help="TREC run to rerank")
    p.add_argument("--depth", type=positive_int, default=100, help="top hits reranked per query")
    p.set_defaults(func=cmd_rerank)

    p = verbs.add_parser("score", help="teacher scores (qid pid score) of each judged query's positives and its "
                                       "candidates from a run or a negatives file; resumable")
    _cross_encoder_arguments(p)
    candidates = p.add_mutually_exclusive_group(required=True)
    candidates.add_argument("--run", help="TREC run whose top-D hits are scored")
    candidates.add_argument("--negatives", help="qid \\t pid,pid negatives file whose first D are scored")
    p.add_argument("--qrels", required=True, help="qrels file or dataset directory (its positives are scored too)")
    p.add_argument("--depth", type=positive_int, default=200, help="candidates scored per query")
    p.set_defaults(func=cmd_score)

    p = verbs.add_parser("train", help="training from a YAML of TrainConfig options: fine-tuning or pretraining "
                                       "(also under `accelerate launch -m reprolib train`)")
    p.add_argument("config", help=f"YAML of TrainConfig options (reprolib/training.py); objective: {', '.join(OBJECTIVES)}")
    p.add_argument("--num-machines", type=positive_int, default=1,
                   help="> 1: run this machine's share of a training over several machines")
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 .. num-machines - 1")
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="processes on all machines together; > 1 runs them under accelerate launch")
    p.add_argument("--main-process-ip", help="the address of machine 0")
    p.add_argument("--main-process-port", type=positive_int, default=29500, help="a free port on machine 0")
    p.set_defaults(func=cmd_train)
    return parser


def _cross_encoder_arguments(p):
    p.add_argument("--model", required=True, help="cross-encoder folder (written by training) or HF name")
    p.add_argument("--corpus", required=True, help="corpus file or dataset directory")
    p.add_argument("--queries", required=True, help="queries file or dataset directory")
    p.add_argument("--split", help="split when --queries / --qrels is a directory")
    p.add_argument("--out", required=True)
    p.add_argument("--template", default="plain", help=f"passage text template: {TEMPLATE_NAMES}")
    p.add_argument("--batch-size", type=positive_int, default=64, help="pairs per forward pass")
    p.add_argument("--max-len", type=positive_int, help="pair max length (default: the model's, else 200)")
    _precision_arguments(p)


def _precision_arguments(p):
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="autocast fp16 (GPU)")
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="autocast bf16 (GPUs, and CPUs with avx512_bf16 or AMX)")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help, or a bad command line (already reported in one line)
        return e.code
    try:
        _check_outputs(args)
        with _terminate_as_interrupt():
            args.func(args)
    except ReprolibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a read-only or full disk, an output path that is a directory, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was written so far is kept; the same command resumes where it can", file=sys.stderr)
        return 130
    return 0


def entry():
    """The `reprolib` command and `python -m reprolib`: main(), then exit with its status.

    A process of an `accelerate launch` (one whose process group is still up) leaves with os._exit: gloo's worker
    threads free a finished collective's tensors on their own, and one still doing so while the interpreter shuts
    down aborts the process ("terminate called without an active exception", 1 run in 4 of a 2-process search)
    after the work was done. Every file was already written and closed; only the output streams need flushing."""
    try:
        code = main()
    except Exception:            # a torch, faiss or gloo error: its traceback, then the same way out
        if not _in_process_group():
            raise
        traceback.print_exc()
        code = 1
    if _in_process_group():
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)     # what C++ code (faiss, torch) printed through C's stdio
        os._exit(code)
    return code


def _in_process_group():
    if "torch.distributed" not in sys.modules:   # never started one (and --help need not import torch)
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(entry())
