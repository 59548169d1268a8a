"""Downloads (resume, checksums, errors), safe extraction, and dataset preparation, all against a
local HTTP server on 127.0.0.1 serving fixture archives built in tmp dirs."""
import gzip
import hashlib
import io
import json
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reprolib.data import prepare_remote
from reprolib.data.download import download, extract
from reprolib.errors import DataError, ReprolibError


# --- a local HTTP server with Range support, 404s and one-shot connection drops -------------------
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and not server.ignore_range:
            start = int(requested.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = server.drop_after.pop(self.path, None)
        # HTTP/1.0: the connection closes after the response, so a short body is a dropped transfer
        self.wfile.write(body if drop is None else body[:drop])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.drop_after, httpd.ignore_range = {}, [], {}, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def payload(size=300_000):
    return bytes((i * 7919 + i // 251) % 256 for i in range(size))


# --- fixture archives ------------------------------------------------------------------------------
def tar_gz(members):
    """A .tar.gz in memory from {name: text or bytes}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buffer.getvalue()


PASSAGES = [f"passage number {pid} about topic {pid % 3}" for pid in range(10)]
TITLES = {0: "Zero", 1: "One", 2: "Two", 4: "Four", 5: "Five", 6: "Six", 7: "Seven", 8: "Eight"}  # no 3, no 9
TRAIN_QUERIES = "100\twhat is topic zero\n101\twhat is topic one\n102\twho is five\n"
DEV_QUERIES = "200\tdev question a\n201\tdev question b\n"
OFFICIAL_QRELS_TRAIN = "100\t0\t0\t1\n101\t0\t1\t1\n102\t0\t5\t1\n"
TRIPLES = ("100\t0\t7\r\n100\t0\t3\r\n100\t0\t7\r\n100\t0\t9\r\n"  # CRLF as in the official file; 7 repeats
           "101\t1\t2\r\n101\t1\t8\r\n"
           "102\t5\t4\r\n")


def marco_archive(passages=None):
    para = passages if passages is not None else "".join(f"{pid}\t{text}\n" for pid, text in enumerate(PASSAGES))
    return tar_gz({
        "marco/para.txt": para,
        "marco/para.title.txt": "".join(f"{pid}\t{title}\n" for pid, title in TITLES.items()),
        "marco/train.query.txt": TRAIN_QUERIES,
        "marco/dev.query.txt": DEV_QUERIES,
        "marco/qrels.train.tsv": "100\t9\n",  # RocketQA's copy: must be replaced by the official one
        "marco/qrels.dev.tsv": "200\t6\n201\t2\n201\t3\n",  # 2-column
    })


@pytest.fixture
def marco_urls(server):
    server.files["/marco.tar.gz"] = marco_archive()
    server.files["/qrels.train.tsv"] = OFFICIAL_QRELS_TRAIN.encode()
    server.files["/triples.tsv.gz"] = gzip.compress(TRIPLES.encode())
    return {"rocketqa_url": server.url + "/marco.tar.gz", "qrels_train_url": server.url + "/qrels.train.tsv",
            "triples_url": server.url + "/triples.tsv.gz", "progress": False}


# --- download ------------------------------------------------------------------------------------
def test_download_verifies_checksums_and_skips_existing_file(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    dest = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(),
                    md5=hashlib.md5(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    download(server.url + "/f.bin", dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert len(server.requests) == 1


def test_download_resumes_after_a_dropped_connection(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    server.drop_after["/f.bin"] = 123_456
    dest = download(server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(), progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [("/f.bin", None), ("/f.bin", "bytes=123456-")]


def test_a_full_disk_is_named_not_retried_as_a_dropped_connection(server, tmp_path, monkeypatch):
    import builtins
    import errno

    from reprolib.data import download as module

    server.files["/f.bin"] = b"x" * 5000

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "open", lambda path, mode="r", *a, **k: Full() if "b" in mode and "r" not in mode
                        else builtins.open(path, mode, *a, **k), raising=False)
    with pytest.raises(ReprolibError, match=r"f\.bin\.part: cannot write the download \(No space left on device\)"):
        download(server.url + "/f.bin", tmp_path / "f.bin", progress=False, retries=1)


def test_download_resumes_a_part_file_left_by_a_crash(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:1000])
    assert download(server.url + "/f.bin", tmp_path / "f.bin", progress=False).read_bytes() == data
    assert server.requests == [("/f.bin", "bytes=1000-")]


def test_download_accepts_a_complete_part_file(server, tmp_path):
    data = payload(5000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data)  # crashed between the last byte and the rename
    assert download(server.url + "/f.bin", tmp_path / "f.bin", progress=False).read_bytes() == data


def test_download_restarts_cleanly_when_the_server_ignores_range(server, tmp_path):
    data = payload()
    server.files["/f.bin"] = data
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5000)
    assert download(server.url + "/f.bin", tmp_path / "f.bin", progress=False).read_bytes() == data


def test_download_gives_up_when_the_server_never_sends_data(server, tmp_path):
    class Always(dict):
        pop = dict.get  # drop every time, not once
    server.files["/f.bin"] = payload(1000)
    server.drop_after = Always({"/f.bin": 0})
    with pytest.raises(ReprolibError, match=r"/f\.bin kept failing: gave up after 0 retries"):
        download(server.url + "/f.bin", tmp_path / "f.bin", retries=0, progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_download_replaces_a_corrupt_existing_file(server, tmp_path):
    data = payload(1000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin").write_bytes(b"corrupt")
    download(server.url + "/f.bin", tmp_path / "f.bin", md5=hashlib.md5(data).hexdigest(), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_checksum_mismatch_raises_and_leaves_no_file(server, tmp_path):
    server.files["/f.bin"] = b"some bytes"
    with pytest.raises(ReprolibError, match=r"f\.bin: sha256 mismatch: expected 0{64}, got [0-9a-f]{64}"):
        download(server.url + "/f.bin", tmp_path / "f.bin", sha256="0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_404_names_the_url(server, tmp_path):
    with pytest.raises(ReprolibError, match=rf"{server.url}/missing\.zip failed: HTTP 404"):
        download(server.url + "/missing.zip", tmp_path / "x.zip", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_connection_refused_names_the_url(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.zip"
    with pytest.raises(ReprolibError, match=rf"{url} failed: .*refused"):
        download(url, tmp_path / "x.zip", progress=False)


# --- extract -------------------------------------------------------------------------------------
def test_extract_strips_prefix_and_is_atomic(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz({"top/a.txt": "A", "top/sub/b.txt": "B", "other/c.txt": "C"}))
    out = extract(archive, tmp_path / "out", prefix="top/")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["a.txt", "sub", "sub/b.txt"]
    assert (out / "sub/b.txt").read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"]  # no staging dir left


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/evil.txt", "top/../../evil.txt"])
def test_extract_refuses_path_traversal(tmp_path, kind, evil):
    members = {"top/ok.txt": "fine", evil: "pwned"}
    archive = tmp_path / ("a.tar.gz" if kind == "tar" else "a.zip")
    archive.write_bytes(tar_gz(members) if kind == "tar" else zip_bytes(members))
    with pytest.raises(ReprolibError, match="outside the extraction directory"):
        extract(archive, tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("damage", ["crc", "truncated", "zip_crc"])
def test_a_damaged_archive_is_named_and_nothing_is_extracted(tmp_path, damage):
    # A download without a checksum is kept: a damaged one must say so rather than pass (a failed gzip CRC sits
    # past the tar's end blocks) or raise a traceback
    members = {"top/a.txt": "A" * 5000, "top/b.txt": "B"}
    if damage == "zip_crc":
        data = bytearray(zip_bytes(members))
        data[data.index(b"A" * 100)] = ord("C")   # stored, not deflated, by zip_bytes: a content byte changed
        name = "a.zip"
    else:
        data = bytearray(tar_gz(members))
        if damage == "crc":
            data[-8] ^= 0xFF   # gzip's trailer: CRC32 of the whole tar
        else:
            data = data[:len(data) // 2]
        name = "a.tar.gz"
    (tmp_path / name).write_bytes(bytes(data))
    with pytest.raises(ReprolibError, match=rf"{name}: damaged archive \(.*\); delete it and run again"):
        extract(tmp_path / name, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_extract_refuses_links(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        link = tarfile.TarInfo("top/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "a.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(ReprolibError, match="link"):
        extract(tmp_path / "a.tar.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- MS MARCO passage ----------------------------------------------------------------------------
EXPECTED_MARCO = {
    "corpus.tsv": "".join(f"{pid}\t{TITLES.get(pid, '')}\t{text}\n" for pid, text in enumerate(PASSAGES)),
    "train.query.txt": TRAIN_QUERIES,
    "dev.query.txt": DEV_QUERIES,
    "qrels.train.tsv": OFFICIAL_QRELS_TRAIN,
    "qrels.dev.tsv": "200\t0\t6\t1\n201\t0\t2\t1\n201\t0\t3\t1\n",
    "train.negatives.tsv": "100\t7,3,9\n101\t2,8\n102\t4\n",
}


def test_msmarco_passage_preparation_gives_the_expected_files(server, marco_urls, tmp_path):
    out = prepare_remote.prepare("msmarco-passage", tmp_path / "marco", **marco_urls)
    for name, text in EXPECTED_MARCO.items():
        assert (out / name).read_text(encoding="utf-8") == text, name
    assert (out / "corpus.tsv").read_text().splitlines()[3] == "3\t\tpassage number 3 about topic 0"
    marker = json.loads((out / "prepared.json").read_text())
    assert marker["dataset"] == "msmarco-passage"
    assert marker["lines"] == {"corpus.tsv": 10, "train.query.txt": 3, "dev.query.txt": 2, "qrels.dev.tsv": 3,
                               "qrels.train.tsv": 3, "train.negatives.tsv": 3}
    assert sorted(p.name for p in (out / "downloads").iterdir()) == ["marco.tar.gz", "qidpidtriples.train.full.2.tsv.gz", "qrels.train.tsv"]

    # a second call is a no-op: no request, no file rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    requests = len(server.requests)
    prepare_remote.prepare("msmarco-passage", out, **marco_urls)
    assert len(server.requests) == requests
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_msmarco_passage_resumes_after_a_crash(server, marco_urls, tmp_path):
    out = prepare_remote.prepare_msmarco_passage(tmp_path, **marco_urls)
    (out / "prepared.json").unlink()
    (out / "corpus.tsv").unlink()
    kept = (out / "train.negatives.tsv").stat().st_mtime_ns
    requests = len(server.requests)
    prepare_remote.prepare_msmarco_passage(tmp_path, **marco_urls)
    assert len(server.requests) == requests  # archives are reused from downloads/
    assert (out / "corpus.tsv").read_text() == EXPECTED_MARCO["corpus.tsv"]
    assert (out / "train.negatives.tsv").stat().st_mtime_ns == kept
    assert (out / "prepared.json").exists()


def test_non_contiguous_pids_name_file_and_line(server, marco_urls, tmp_path):
    server.files["/marco.tar.gz"] = marco_archive("0\ta\n1\tb\n3\td\n")
    with pytest.raises(DataError, match=r"para\.txt:3: pid 3 where 2 was expected"):
        prepare_remote.prepare_msmarco_passage(tmp_path, **marco_urls)
    assert not (tmp_path / "corpus.tsv").exists() and not (tmp_path / "prepared.json").exists()


def test_triples_to_negatives_groups_consecutive_lines(tmp_path):
    (tmp_path / "t.tsv").write_text("1\t9\t5\n1\t9\t6\n1\t9\t5\n2\t8\t5\n1\t9\t7\n")
    prepare_remote.convert_triples_to_negatives(tmp_path / "t.tsv", tmp_path / "n.tsv")
    assert (tmp_path / "n.tsv").read_text() == "1\t5,6\n2\t5\n1\t7\n"


# --- BEIR and LoTTE ------------------------------------------------------------------------------
BEIR_FILES = {
    "scifact/corpus.jsonl": '{"_id": "d1", "title": "T", "text": "caf\\u00e9"}\n',
    "scifact/queries.jsonl": '{"_id": "q1", "text": "what?"}\n',
    "scifact/qrels/test.tsv": "query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n",
}


def test_beir_layout_is_unchanged(server, tmp_path):
    archive = zip_bytes({**BEIR_FILES, "__MACOSX/scifact/._corpus.jsonl": "junk"})
    server.files["/scifact.zip"] = archive
    out = prepare_remote.prepare("beir/scifact", tmp_path / "scifact", url=server.url + "/scifact.zip",
                                 md5=hashlib.md5(archive).hexdigest(), progress=False)
    for name, text in BEIR_FILES.items():
        assert (out / name.removeprefix("scifact/")).read_bytes() == text.encode()
    assert sorted(p.name for p in out.iterdir()) == ["corpus.jsonl", "downloads", "prepared.json", "qrels", "queries.jsonl"]
    assert json.loads((out / "prepared.json").read_text())["lines"] == {"corpus.jsonl": 1, "qrels/test.tsv": 2, "queries.jsonl": 1}


def test_beir_md5_mismatch(server, tmp_path):
    server.files["/scifact.zip"] = zip_bytes(BEIR_FILES)
    with pytest.raises(ReprolibError, match="md5 mismatch"):
        prepare_remote.prepare_beir("scifact", tmp_path, url=server.url + "/scifact.zip", md5="0" * 32, progress=False)
    assert not (tmp_path / "corpus.jsonl").exists()


LOTTE_SPLIT = {"collection.tsv": "0\tfirst doc\n1\tsecond doc\n", "questions.search.tsv": "0\thow to write\n",
               "questions.forum.tsv": "0\twriting forum q\n", "qas.search.jsonl": '{"qid": 0, "answer_pids": [1]}\n',
               "qas.forum.jsonl": '{"qid": 0, "answer_pids": [0]}\n', "metadata.jsonl": "{}\n"}


def test_lotte_extracts_only_the_requested_split(server, tmp_path):
    members = {f"lotte/writing/dev/{name}": text for name, text in LOTTE_SPLIT.items()}
    members |= {"lotte/writing/test/collection.tsv": "0\tother\n", "lotte/science/dev/collection.tsv": "0\tsci\n"}
    server.files["/lotte.tar.gz"] = tar_gz(members)
    out = prepare_remote.prepare("lotte/writing/dev", tmp_path / "w", url=server.url + "/lotte.tar.gz",
                                 download_dir=tmp_path / "cache", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*LOTTE_SPLIT, "prepared.json"])
    for name, text in LOTTE_SPLIT.items():
        assert (out / name).read_text() == text
    # a second split reuses the shared download
    prepare_remote.prepare("lotte/writing/test", tmp_path / "t", url=server.url + "/lotte.tar.gz",
                           download_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "t" / "collection.tsv").read_text() == "0\tother\n"
    assert len(server.requests) == 1


@pytest.mark.parametrize("name, problem", [("lotte/poetry/dev", "unknown LoTTE domain 'poetry'"),
                                           ("lotte/writing/train", "unknown LoTTE split 'train'"),
                                           ("synthetic", "unknown dataset 'synthetic'"),
                                           ("beir/a/b", "hard-negatives, beir/<name> or lotte/<domain>/<split>")])
def test_bad_names_fail_before_any_download(server, tmp_path, name, problem):
    with pytest.raises(ReprolibError, match=problem):
        prepare_remote.prepare(name, tmp_path, url=server.url + "/lotte.tar.gz", progress=False)
    assert server.requests == [] and list(tmp_path.iterdir()) == []


def test_a_directory_holding_another_dataset_is_refused(server, marco_urls, tmp_path):
    prepare_remote.prepare_msmarco_passage(tmp_path, **marco_urls)
    with pytest.raises(ReprolibError, match="already holds dataset 'msmarco-passage'"):
        prepare_remote.prepare_beir("scifact", tmp_path, url=server.url + "/scifact.zip", progress=False)


def test_data_prepare_command_downloads_from_the_given_url(server, tmp_path):
    from reprolib.cli import main

    server.files["/scifact.zip"] = zip_bytes(BEIR_FILES)
    out = tmp_path / "scifact"
    assert main(["data", "prepare", "beir/scifact", "--out", str(out), "--url", f"url={server.url}/scifact.zip"]) == 0
    assert (out / "qrels" / "test.tsv").exists()
    assert main(["data", "validate", str(out)]) == 0
    assert main(["data", "prepare", "beir/scifact", "--out", str(out), "--url", "no-equals-sign"]) == 2
