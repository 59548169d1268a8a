"""Readers and writers for the retrieval file formats, with one-line errors naming file and line.

Queries, qrels, negatives and runs are small enough to hold as dicts of strings; corpora are not,
and live in `reprolib.data.corpus`.

| kind      | formats read                                                                   |
|-----------|--------------------------------------------------------------------------------|
| queries   | `qid \\t text` (MS MARCO, LoTTE questions.*.tsv); BEIR queries.jsonl             |
| qrels     | TREC `qid 0 pid rel`; `qid \\t pid`; BEIR tsv with header; LoTTE qas.*.jsonl     |
| negatives | `qid \\t pid,pid,...`; MS MARCO qidpidtriples (via `triples_to_negatives`)       |
| runs      | TREC `qid Q0 pid rank score tag`                                                |
| scores    | `qid pid score` (teacher scores; RetroMAE's `[score]` too); sentence-transformers'  |
|           | cross-encoder scores pickle (`{qid: {pid: logit}}`, `.pkl` or `.pkl.gz`)          |
"""
import contextlib
import gzip
import json
import math
import pickle
import re
import zlib
from pathlib import Path

import numpy as np

from reprolib.errors import DataError, ReprolibError
from reprolib.fileio import atomic_write, iter_lines, split_fields

_WHITESPACE = re.compile(r"\s")   # what str.isspace() calls whitespace
_LINE_BREAKS = re.compile(r"[\t\r\n]")   # what would split a tab-separated line or the line itself


def json_record(path, number, line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, number, f"invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise DataError(path, number, "expected a JSON object")
    return record


def _field(path, number, record, *names):
    for name in names:
        if name in record:
            return record[name]
    raise DataError(path, number, f"missing field {names[0]!r}")


def record_id(path, number, value, what):
    """A JSON id as a string: a string or an integer, never null, and without whitespace, which TREC runs and
    qrels (whitespace separated) could not carry back."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(path, number, f"{what} must be a string or an integer, got {json.dumps(value)}")
    return check_id(path, number, str(value), what)


def check_id(path, number, value, what):
    if not value:
        raise DataError(path, number, f"empty {what}")
    if any(c.isspace() for c in value):
        raise DataError(path, number, f"{what} {value!r} contains whitespace, which TREC runs and qrels cannot carry")
    return value


def record_text(path, number, record, name, required=True):
    """A JSON text field as a string ('' when absent or null and not `required`)."""
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, number, f"field {name!r} must be a string, got {json.dumps(value)[:40]}")
    return value


def _put_unique(table, key, value, path, number, what):
    if key in table:
        raise DataError(path, number, f"duplicate {what} {key!r}")
    table[key] = value


# ---------------------------------------------------------------- queries

def read_queries(path):
    """qid -> text from a `qid \\t text` file or a BEIR/JSONL file."""
    path = Path(path)
    queries = {}
    is_json = path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz")
    for number, line in iter_lines(path):
        if is_json:
            record = json_record(path, number, line)
            qid = record_id(path, number, _field(path, number, record, "_id", "qid"), "query id")
            _field(path, number, record, "text", "query")   # present, under either name
            text = record_text(path, number, record, "text" if "text" in record else "query")
        else:
            qid, text = split_fields(path, number, line, (2,))
            check_id(path, number, qid, "query id")
        if not str(text).strip():
            raise DataError(path, number, f"empty query text for {qid!r}")
        _put_unique(queries, qid, text, path, number, "query id")
    return queries


def write_queries(path, queries):
    """`qid<TAB>text` lines. A tab or line break inside a text (BEIR's texts have some) becomes a space, so that
    `read_queries` reads each query back as written; an id with whitespace is refused."""
    with atomic_write(path) as f:
        for qid, text in queries.items():
            check_id(path, None, str(qid), "query id")
            f.write(f"{qid}\t{_LINE_BREAKS.sub(' ', str(text))}\n")


# ---------------------------------------------------------------- qrels

def read_qrels(path):
    """qid -> {pid: relevance} from TREC, 2-column, BEIR (header) or LoTTE qas.jsonl qrels."""
    path = Path(path)
    qrels = {}
    if path.name.endswith((".jsonl", ".jsonl.gz")):  # LoTTE: {"qid": .., "answer_pids": [..]}
        for number, line in iter_lines(path):
            record = json_record(path, number, line)
            qid = record_id(path, number, _field(path, number, record, "qid"), "qid")
            pids = _field(path, number, record, "answer_pids")
            if not isinstance(pids, list):
                raise DataError(path, number, f"answer_pids must be a list of ids, got {json.dumps(pids)}")
            judged = {record_id(path, number, pid, "answer pid"): 1 for pid in pids}
            _put_unique(qrels, qid, judged, path, number, "query id")
        if not qrels:
            raise DataError(path, None, "no judgements: the qrels file is empty")
        return qrels
    width = None  # fixed by the first row, so a truncated line is an error, not another format
    for number, line in iter_lines(path):
        if number == 1 and _is_qrels_header(line):
            continue
        if line.lstrip().startswith("#"):
            continue  # trec_eval comment line ('#' inside an id is kept)
        fields = split_fields(path, number, line, (width,) if width else (2, 3, 4), sep=None)
        width = len(fields)
        if len(fields) == 2:
            qid, pid, rel = fields[0], fields[1], "1"
        elif len(fields) == 3:
            qid, pid, rel = fields
        else:
            qid, _, pid, rel = fields
        try:
            relevance = int(rel)
        except ValueError:
            raise DataError(path, number, f"relevance {rel!r} is not an integer") from None
        judged = qrels.setdefault(qid, {})
        _put_unique(judged, pid, relevance, path, number, f"judgement for query {qid!r}, doc")
    if not qrels:
        raise DataError(path, None, "no judgements: the qrels file is empty")
    return qrels


def write_qrels(path, qrels, style="trec"):
    """Write TREC `qid 0 pid rel`, or BEIR's `query-id corpus-id score` with header (`style="beir"`)."""
    with atomic_write(path) as f:
        if style == "beir":
            f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for pid, rel in judged.items():
                f.write(f"{qid}\t{pid}\t{rel}\n" if style == "beir" else f"{qid}\t0\t{pid}\t{rel}\n")


def rewrite_qrels(path, qrels):
    """Rewrite a qrels file in its own format (TREC, BEIR or LoTTE qas.jsonl, keeping other fields)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        records = [json_record(path, number, line) for number, line in iter_lines(path)]
        with atomic_write(path) as f:
            for record in records:
                qid = str(record["qid"])
                if qid in qrels:
                    record["answer_pids"] = [p for p in record["answer_pids"] if str(p) in qrels[qid]]
                    f.write(json.dumps(record) + "\n")
        return
    first = next(iter_lines(path), (0, ""))[1]
    write_qrels(path, qrels, style="beir" if _is_qrels_header(first) else "trec")


def _is_qrels_header(line):
    """BEIR's header line, or a header of another name for its columns."""
    return line.split("\t")[0] in ("query-id", "qid", "query_id")


# ---------------------------------------------------------------- negatives

def read_negatives(path):
    """qid -> [pid, ...] in file order (rank order for mined negatives)."""
    path = Path(path)
    negatives = {}
    for number, qid, ranked in _negatives_lines(path):
        _put_unique(negatives, qid, ranked, path, number, "query id")
    return negatives


def iter_negatives(path):
    """(qid, [pid, ...]) one line at a time, for files too large to hold (MS MARCO's mined negatives: 500k
    queries x 200 passages); a query listed twice is an error, as in `read_negatives`."""
    path = Path(path)
    seen = set()
    for number, qid, ranked in _negatives_lines(path):
        if qid in seen:
            raise DataError(path, number, f"duplicate query id {qid!r}")
        seen.add(qid)
        yield qid, ranked


def _negatives_lines(path):
    for number, line in iter_lines(path):
        qid, pids = split_fields(path, number, line, (2,))
        ranked = [p for p in pids.split(",") if p]
        if not ranked:
            raise DataError(path, number, f"no negatives listed for query {qid!r}")
        yield number, qid, ranked


def write_negatives(path, negatives):
    """`negatives`: qid -> [pid, ...], or an iterable of (qid, pids) pairs so that a large table streams
    through; a query without negatives gets no line. Returns the number of lines written."""
    rows = negatives.items() if isinstance(negatives, dict) else negatives
    written = 0
    with atomic_write(path) as f:
        for qid, pids in rows:
            if pids:
                f.write(f"{qid}\t{','.join(pids)}\n")
                written += 1
    return written


# ---------------------------------------------------------------- runs

def read_run(path):
    """qid -> {pid: score} from a TREC run (the rank column is ignored, as trec_eval does). A list of paths reads
    runs of disjoint queries as one, such as a cross-fitted teacher's folds, each scored by a model trained on the
    others; a query in two of them is an error."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ReprolibError("read_run: no run files given")
        if len(set(map(str, path))) < len(path):
            raise ReprolibError(f"read_run: a run file is listed twice in {[str(p) for p in path]}")
        run, seen_in = {}, {}
        for part in path:
            for qid, hits in read_run(part).items():
                if qid in run:
                    raise DataError(part, None, f"query {qid!r} is also in {seen_in[qid]}: the runs must not share queries")
                run[qid], seen_in[qid] = hits, part
        return run
    path = Path(path)
    run = {}
    for number, qid, pid, value in _run_lines(path):
        _put_unique(run.setdefault(qid, {}), pid, value, path, number, f"hit for query {qid!r}, doc")
    if not run:
        raise DataError(path, None, "no hits: the run file is empty")
    return run


def read_hits(path):
    """{qid: {pid: score}} of a TREC run or of a teacher-scores file (`qid pid score`, notebook 60's scored training
    pairs), told apart by the first line; a list of paths is `read_run`'s union of disjoint runs."""
    if isinstance(path, (list, tuple)):
        return read_run(path)
    path = Path(path)
    if path.name.endswith((".pkl", ".pkl.gz")):
        return read_scores(path)
    first = next((line for _, line in iter_lines(path) if not line.lstrip().startswith("#")), "").split()
    return read_scores(path) if len(first) == 3 else read_run(path)


class NotGrouped(DataError):
    """A file read query by query lists some query's lines apart; read it whole instead."""


def iter_run(path):
    """(qid, {pid: score}) one query at a time, for runs too large to hold (a mined top-200 of MS MARCO's 500k
    train queries is 100M lines). The file must list each query's hits together, as TREC runs do."""
    path = Path(path)
    empty = True
    for qid, hits in _by_query(path, _run_lines(path), "hit", "(sort -s -k1,1 groups them)"):
        empty = False
        yield qid, hits
    if empty:
        raise DataError(path, None, "no hits: the run file is empty")


def chunked(items, size):
    """Lists of up to `size` consecutive items (itertools.batched, which needs Python 3.12)."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _by_query(path, lines, what, hint):
    """(qid, {pid: value}) of (number, qid, pid, value) lines that list each query's lines together."""
    qid, hits, seen = None, {}, set()
    for number, q, pid, value in lines:
        if q != qid:
            if qid is not None:
                yield qid, hits
            if q in seen:
                raise NotGrouped(path, number, f"query {q!r} appears again after other queries; a file read query "
                                               f"by query must list each query's lines together {hint}")
            seen.add(q)
            qid, hits = q, {}
        _put_unique(hits, pid, value, path, number, f"{what} for query {qid!r}, doc")
    if qid is not None:
        yield qid, hits


def _run_lines(path):
    """(line number, qid, pid, score) of each hit line of a TREC run."""
    for number, line in iter_lines(path):
        if line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 6:  # trec_eval ignores fields after the tag, and so do we
            raise DataError(path, number, f"expected 6 fields (qid Q0 doc rank score tag), found {len(fields)}: {line[:80]!r}")
        qid, pid, score = fields[0], fields[2], fields[4]
        try:
            value = float(score)
        except ValueError:
            raise DataError(path, number, f"score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(path, number, f"score {score!r} is not a finite number")
        yield number, qid, pid, value


def write_run(path, run, tag="reprolib"):
    """Write hits sorted by score (descending) with ranks 1..k."""
    with atomic_write(path) as f:
        for qid, hits in run.items():
            _check_run_ids(path, qid, hits)
            ranked = sorted(hits.items(), key=lambda hit: -hit[1])
            f.write("".join([f"{qid} Q0 {pid} {rank} {score:.6f} {tag}\n" for rank, (pid, score) in enumerate(ranked, 1)]))


def _check_run_ids(path, qid, hits):
    """A TREC run's ids are whitespace-free and not empty; one search over the query's ids joined, then id by id
    only to name the bad one."""
    if qid and "" not in hits and not _WHITESPACE.search(qid + "".join(hits)):
        return
    for text, what in ((qid, "query id"), *((pid, "doc id") for pid in hits)):
        if not text or _WHITESPACE.search(text):
            raise DataError(path, None, f"{what} {text!r} is empty or contains whitespace: a TREC run cannot carry it")


# ---------------------------------------------------------------- teacher scores

def read_scores(path):
    """qid -> {pid: score} of a cross-encoder teacher: a `qid pid score` text file (whitespace separated;
    RetroMAE writes the score as `[0.12]`) or sentence-transformers' `{qid: {pid: score}}` pickle."""
    path = Path(path)
    if path.name.endswith((".pkl", ".pkl.gz")):
        return _read_scores_pickle(path)
    scores = {}
    for number, qid, pid, value in _score_lines(path):
        _put_unique(scores.setdefault(qid, {}), pid, value, path, number, f"score for query {qid!r}, doc")
    return scores


def iter_scores(path):
    """(qid, {pid: score}) of a `qid pid score` text file one query at a time, for files too large to hold;
    each query's lines must be together, as `reprolib score` writes them."""
    path = Path(path)
    yield from _by_query(path, _score_lines(path), "score", "(as reprolib score writes them)")


def _score_lines(path):
    for number, line in iter_lines(path):
        if line.lstrip().startswith("#"):   # comments, as in a run (read_hits skips them to tell the two apart)
            continue
        fields = line.split()
        if len(fields) != 3:
            raise DataError(path, number, f"expected 3 fields (qid pid score), found {len(fields)}: {line[:80]!r}")
        qid, pid, score = fields
        try:
            value = float(score.strip("[]"))
        except ValueError:
            raise DataError(path, number, f"score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(path, number, f"score {score!r} is not a finite number")
        yield number, qid, pid, value


def write_scores(path, scores):
    with atomic_write(path) as f:
        for qid, hits in scores.items():
            for pid, score in hits.items():
                f.write(f"{qid}\t{pid}\t{score:.7g}\n")


class _ScoresUnpickler(pickle.Unpickler):
    """Plain containers and numpy scalars only: a pickle can run any code it names, so nothing else loads."""
    ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_scores_pickle(path):
    """sentence-transformers' `{qid: {pid: score}}` pickle as stored (int ids, float or numpy scores).

    No converted copy is made: the MS MARCO file holds 160M scores, so a second table would double the
    memory a lookup by int id needs.
    """
    path = Path(path)
    try:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as f:
            table = _ScoresUnpickler(f).load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError) as e:
        raise DataError(path, None, f"not a scores pickle ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(hits, dict) for hits in table.values()):
        raise DataError(path, None, "expected a pickled dict {qid: {pid: score}}")
    return table


def iter_scores_pickle(path):
    """(qid, {pid: score}) of sentence-transformers' `{qid: {pid: score}}` pickle, one query at a time, ids as
    stored (int). The file is parsed opcode by opcode, so MS MARCO's 160M scores are never all in memory
    (`pickle.load` builds ~15 GB of Python objects). Plain ints, strings and floats only: a pickle holding
    anything else (numpy scalars) raises `_Unsupported`, and the caller loads it whole instead."""
    import struct

    opener = gzip.open if Path(path).name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from _PickledScores(f).items()
    except (OSError, EOFError, zlib.error, struct.error, IndexError, KeyError, UnicodeDecodeError, AttributeError) as e:
        raise DataError(path, None, f"not a complete scores pickle ({type(e).__name__}: {e})") from None


class _Unsupported(Exception):
    """An opcode `iter_scores_pickle` does not read."""


class _PickledScores:
    """A stack machine for the opcodes of a pickled dict of dicts of numbers (protocols 2-5), reading the file
    through a 1 MB buffer (one read call per opcode would cost more than the parsing)."""

    _MARK, _DROPPED = object(), object()
    _CHUNK = 1 << 20

    def __init__(self, f):
        self.f, self.buffer, self.at, self.stack, self.memo, self.outer = f, b"", 0, [], {}, None

    def _refill(self, n):
        """Read more, so that at least `n` bytes are available from `self.at` (fewer only at the end)."""
        self.buffer = self.buffer[self.at:] + self.f.read(max(n, self._CHUNK))
        self.at = 0
        if not self.buffer:
            raise EOFError("the pickle ends early")

    def _to_mark(self):
        i = len(self.stack) - 1
        while self.stack[i] is not self._MARK:
            i -= 1
        items = self.stack[i + 1:]
        del self.stack[i:]
        return items

    # A (pid, score) pair as pickle writes most of MS MARCO's: BININT (4-byte pid) then BINFLOAT (8-byte score)
    _PAIR = np.dtype([("int_op", "u1"), ("pid", "<i4"), ("float_op", "u1"), ("score", ">f8")])
    _BATCH = 1000                           # pickle's SETITEMS batch: a MARK is followed by at most 1000 pairs

    def _int_float_pairs(self, target):
        """Decode the run of BININT/BINFLOAT pairs after an inner dict's MARK with numpy, straight into the
        dict (SETITEMS would add them first anyway), and return where the run ends: a parse ~10x faster than
        one opcode at a time. Any other opcode ends the run; the stack machine reads on from there."""
        if len(self.buffer) - self.at < self._BATCH * self._PAIR.itemsize:
            with contextlib.suppress(EOFError):
                self._refill(self._BATCH * self._PAIR.itemsize)
        count = min(self._BATCH, (len(self.buffer) - self.at) // self._PAIR.itemsize)
        pairs = np.frombuffer(self.buffer, self._PAIR, count, self.at)
        ends = np.flatnonzero((pairs["int_op"] != 0x4A) | (pairs["float_op"] != 0x47))
        pairs = pairs[:ends[0] if len(ends) else count]
        target.update(zip(pairs["pid"].tolist(), pairs["score"].tolist()))
        return self.at + len(pairs) * self._PAIR.itemsize

    def items(self):
        import struct

        stack, memo = self.stack, self.memo
        double, int4, uint2, uint4 = (struct.Struct(f).unpack_from for f in (">d", "<i", "<H", "<I"))
        while True:
            if self.at + 9 > len(self.buffer):   # an opcode and its fixed-size argument
                self._refill(9)
            buffer, at = self.buffer, self.at
            op = buffer[at]
            at += 1
            if op == 0x47:                      # G: BINFLOAT
                stack.append(double(buffer, at)[0])
                at += 8
            elif op == 0x4A:                    # J: BININT
                stack.append(int4(buffer, at)[0])
                at += 4
            elif op == 0x4B:                    # K: BININT1
                stack.append(buffer[at])
                at += 1
            elif op == 0x4D:                    # M: BININT2
                stack.append(uint2(buffer, at)[0])
                at += 2
            elif op in (0x8A, 0x8C, 0x58):      # LONG1, SHORT_BINUNICODE, BINUNICODE: a length, then bytes
                size, at = (buffer[at], at + 1) if op != 0x58 else (uint4(buffer, at)[0], at + 4)
                if at + size > len(buffer):
                    self.at = at
                    self._refill(size)
                    buffer, at = self.buffer, 0
                    if size > len(buffer):
                        raise EOFError("the pickle ends early")
                data = buffer[at:at + size]
                at += size
                stack.append(int.from_bytes(data, "little", signed=True) if op == 0x8A else data.decode("utf-8"))
            elif op == 0x28:                    # (: MARK
                stack.append(self._MARK)
                if len(stack) > 1 and isinstance(stack[-2], dict) and stack[-2] is not self.outer:
                    self.at = at
                    at = self._int_float_pairs(stack[-2])
            elif op == 0x7D:                    # }: EMPTY_DICT
                stack.append({})
                if self.outer is None:
                    self.outer = stack[-1]
            elif op in (0x75, 0x73):            # u: SETITEMS, s: SETITEM
                items = self._to_mark() if op == 0x75 else [stack.pop(-2), stack.pop()]
                if stack[-1] is self.outer:     # the queries: hand them out instead of keeping them
                    self.at = at
                    yield from zip(items[0::2], items[1::2])
                    continue
                stack[-1].update(zip(items[0::2], items[1::2]))
            elif op in (0x94, 0x71, 0x72):      # MEMOIZE, BINPUT, LONG_BINPUT
                if op == 0x94:
                    key = len(memo)
                else:
                    key, at = (buffer[at], at + 1) if op == 0x71 else (uint4(buffer, at)[0], at + 4)
                # pickle memoizes every query's dict: keeping them would hold the whole table
                memo[key] = self._DROPPED if isinstance(stack[-1], dict) else stack[-1]
            elif op in (0x68, 0x6A):            # BINGET, LONG_BINGET
                key, at = (buffer[at], at + 1) if op == 0x68 else (uint4(buffer, at)[0], at + 4)
                if memo[key] is self._DROPPED:
                    raise _Unsupported("a dict referenced twice")
                stack.append(memo[key])
            elif op == 0x95:                    # FRAME: its length; its opcodes follow as usual
                at += 8
            elif op == 0x80:                    # PROTO
                at += 1
            elif op == 0x2E:                    # .: STOP
                return
            else:
                raise _Unsupported(f"opcode {bytes([op])!r}")
            self.at = at


def _read_scores_pickle(path):
    table = load_scores_pickle(path)
    try:
        return {str(qid): {str(pid): float(score) for pid, score in hits.items()} for qid, hits in table.items()}
    except (TypeError, ValueError) as e:
        raise DataError(path, None, f"a score that is not a number ({e})") from None


# ---------------------------------------------------------------- id checks

def check_doc_ids(path, table, corpus):
    """Raise on the first doc id in a qrels/run/negatives table that `corpus` lacks.

    The line is found by re-scanning the file, so the happy path costs nothing extra.
    """
    missing = set(corpus.missing({pid for pids in table.values() for pid in pids}))
    for qid, pids in table.items():
        for pid in pids:
            if pid in missing:
                raise DataError(path, _line_of(path, qid, pid), f"unknown doc id {pid!r} (query {qid!r}) not in the corpus")


def check_query_ids(path, table, queries):
    for qid in table:
        if qid not in queries:
            raise DataError(path, _line_of(path, qid, ""), f"unknown query id {qid!r} not in the queries")


def drop_unknown_docs(qrels, corpus):
    """Remove qrels rows whose doc is not in the corpus; return (qrels, number dropped)."""
    missing = set(corpus.missing({pid for judged in qrels.values() for pid in judged}))
    kept = {}
    for qid, judged in qrels.items():
        present = {pid: rel for pid, rel in judged.items() if pid not in missing}
        if present:
            kept[qid] = present
    dropped = sum(len(j) for j in qrels.values()) - sum(len(j) for j in kept.values())
    return kept, dropped


def _line_of(path, qid, pid):
    for number, line in iter_lines(path):
        fields = line.split()
        if not fields or fields[0] != qid:
            continue
        if not pid:
            return number
        # TREC qrels/runs hold the doc in column 3; BEIR/2-column qrels and negatives in column 2
        docs = [fields[2]] if len(fields) >= 4 else fields[1].split(",") if len(fields) > 1 else []
        if pid in docs:
            return number
    return None
