"""The memory-mapped Corpus: formats, lookups, errors, and store reuse/rebuild."""
import json
import os

import numpy as np
import pytest

from conftest import shared_dataset
from reprolib.data import corpus as corpus_module
from reprolib.data.corpus import Corpus, cache_root
from reprolib.errors import DataError


def write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.fixture
def tsv3(tmp_path):
    return write(tmp_path / "corpus.tsv", "10\tTitle ten\tText ten\n2\t\tText two, no title\nabc\tT\tLetters\n")


def test_tsv_three_columns(tsv3):
    corpus = Corpus.open(tsv3, progress=False)
    assert len(corpus) == 3
    assert corpus[0] == {"id": "10", "title": "Title ten", "text": "Text ten"}
    assert corpus[1] == {"id": "2", "title": "", "text": "Text two, no title"}
    assert corpus.id(2) == "abc" and corpus.title(2) == "T" and corpus.text(2) == "Letters"
    assert [p["id"] for p in corpus] == ["10", "2", "abc"]  # file order


def test_tsv_two_columns(tmp_path):
    corpus = Corpus.open(write(tmp_path / "corpus.tsv", "0\tfirst passage\n1\tsecond passage\n"), progress=False)
    assert len(corpus) == 2
    assert corpus[1] == {"id": "1", "title": "", "text": "second passage"}


def test_beir_jsonl_from_directory(tmp_path):
    records = [{"_id": "d1", "title": "A title", "text": "Body one", "metadata": {}},
               {"_id": 42, "title": None, "text": "Numeric id"},
               {"_id": "d3", "text": "No title key"}]
    write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    corpus = Corpus.open(tmp_path, progress=False)  # a dataset directory is accepted
    assert len(corpus) == 3
    assert corpus.get("d1") == {"id": "d1", "title": "A title", "text": "Body one"}
    assert corpus.get("42") == {"id": "42", "title": "", "text": "Numeric id"}
    assert corpus.get("d3")["title"] == ""


def test_lookups(tsv3):
    corpus = Corpus.open(tsv3, progress=False)
    assert corpus.get("abc")["text"] == "Letters"
    assert corpus.get("2")["id"] == "2"
    with pytest.raises(KeyError):
        corpus.get("missing")
    positions = corpus.positions(["abc", "10", "nope", "2", "1", "100", "ab", "abcd", ""])
    assert positions.tolist() == [2, 0, -1, 1, -1, -1, -1, -1, -1]
    assert corpus.positions([]).tolist() == []
    assert corpus.missing(["10", "x", "abc", "abcdefgh"]) == ["x", "abcdefgh"]


def test_over_long_id_is_not_found(tmp_path):
    # ids are stored fixed-width (3 bytes here); a longer query id must not match its truncated prefix
    corpus = Corpus.open(write(tmp_path / "corpus.tsv", "abc\tx\nab\ty\n"), progress=False)
    assert corpus.positions(["abcdef", "abc", "ab", "abcd"]).tolist() == [-1, 0, 1, -1]
    with pytest.raises(KeyError):
        corpus.get("abcz")


def test_ids_that_are_row_numbers_are_found_without_a_search_and_the_rest_are_still_searched(tmp_path):
    """MS MARCO's ids are "0".."N-1": an id is tried as its own row first. Rows holding another id, leading
    zeros, truncated ids and non-numbers must still give exactly what a dictionary gives."""
    ids = ["0", "1", "x", "3", "03", "10", "2", "7"]
    corpus = Corpus.open(write(tmp_path / "corpus.tsv", "".join(f"{i}\tt\n" for i in ids)), progress=False)
    truth = {pid: position for position, pid in enumerate(ids)}
    keys = ["0", "1", "2", "3", "03", "003", "10", "100", "4", "6", "7", "x", "-1", "", "1e1", " 3", "99"]
    assert corpus.positions(keys).tolist() == [truth.get(k, -1) for k in keys]
    numeric = [k for k in keys if k.isdigit()]
    assert corpus.positions(numeric).tolist() == [truth.get(k, -1) for k in numeric]
    rows = Corpus.open(write(tmp_path / "rows.tsv", "".join(f"{i}\tt\n" for i in range(12))), progress=False)
    assert rows.positions(["11", "110", "1", "12", "011"]).tolist() == [11, -1, 1, -1, -1]   # 110 is not row 11


def test_non_ascii_round_trip(tmp_path):
    text = "Zürich — naïve café ☕ 東京 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    source = write(tmp_path / "corpus.tsv", f"é1\tTïtle ✓\t{text}\nplain\t\tascii\n")
    corpus = Corpus.open(source, progress=False)
    assert corpus[0] == {"id": "é1", "title": "Tïtle ✓", "text": text}
    assert corpus.get("é1")["text"] == text
    assert corpus.positions(["plain", "é1", "é"]).tolist() == [1, 0, -1]


def test_duplicate_id_names_second_occurrence(tmp_path):
    source = write(tmp_path / "corpus.tsv", "1\ta\n\n2\tb\n3\tc\n2\tagain\n1\tonce more\n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert info.value.line in (5, 6)  # the second occurrence of '2' or of '1', never a first occurrence
    assert str(info.value) == f"{source.resolve()}:{info.value.line}: duplicate passage id {'2' if info.value.line == 5 else '1'!r}"


def test_duplicate_id_single_pair(tmp_path):
    source = write(tmp_path / "corpus.tsv", "a\tx\nb\ty\nc\tz\nb\tw\n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert str(info.value) == f"{source.resolve()}:4: duplicate passage id 'b'"


def test_empty_passage(tmp_path):
    source = write(tmp_path / "corpus.tsv", "1\tT\tok\n2\t \t  \n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert str(info.value) == f"{source.resolve()}:2: empty passage '2' (no title and no text)"


def test_empty_passage_id(tmp_path):
    source = write(tmp_path / "corpus.tsv", "1\tok\n\ttext\n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert str(info.value) == f"{source.resolve()}:2: empty passage id"


def test_wrong_field_count(tmp_path):
    source = write(tmp_path / "corpus.tsv", "1\tok\n2\ta\tb\tc\n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert info.value.line == 2 and "found 4" in str(info.value)


def test_bad_json_record(tmp_path):
    source = write(tmp_path / "corpus.jsonl", '{"_id": "1", "text": "ok"}\n{"title": "no id"}\n')
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert str(info.value).startswith(f"{source.resolve()}:2: not a corpus record")


def test_non_utf8(tmp_path):
    source = write(tmp_path / "corpus.tsv", b"1\tok\n2\tbad \xc3\x28 byte\n")
    with pytest.raises(DataError) as info:
        Corpus.open(source, progress=False)
    assert str(info.value) == f"{source.resolve()}:2: not valid UTF-8 (byte 0xc3 at column 7)"


def test_missing_source(tmp_path):
    with pytest.raises(DataError) as info:
        Corpus.open(tmp_path / "nope.tsv", progress=False)
    assert str(info.value) == f"{tmp_path / 'nope.tsv'}: file or directory not found"
    with pytest.raises(DataError) as info:
        Corpus.open(tmp_path, progress=False)  # a directory with no corpus file
    assert str(info.value).startswith(f"{tmp_path}: no corpus file in this directory")


def test_store_lives_under_reprolib_cache(tsv3, reprolib_cache):
    corpus = Corpus.open(tsv3, progress=False)
    assert cache_root() == reprolib_cache
    assert corpus.store_dir.parent == reprolib_cache / "corpus"


def test_second_open_reuses_the_store(tsv3, monkeypatch):
    first = Corpus.open(tsv3, progress=False)
    stamp = {f.name: f.stat().st_mtime_ns for f in first.store_dir.iterdir()}
    assert {"ids.npy", "meta.json", "text.bin"} <= set(stamp)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("store was rebuilt")

    monkeypatch.setattr(corpus_module, "build_store", no_rebuild)
    second = Corpus.open(tsv3, progress=False)
    assert second.store_dir == first.store_dir
    assert {f.name: f.stat().st_mtime_ns for f in second.store_dir.iterdir()} == stamp
    assert second[0] == first[0]


def test_stages_building_one_store_at_once_both_get_it(tsv3, monkeypatch):
    """Two stages of a `--jobs 2` run opening a new corpus at once once shared one temp folder, and one deleted what
    the other was writing ("duplicate passage id ''" on SciFact). Here the other stage starts and finishes its
    build in the middle of this one's."""
    real = corpus_module._write_store
    others = []

    def another_stage_meanwhile(source, tmp, progress):
        monkeypatch.setattr(corpus_module, "_write_store", real)
        others.append(Corpus.open(tsv3, progress=False))
        real(source, tmp, progress)

    monkeypatch.setattr(corpus_module, "_write_store", another_stage_meanwhile)
    corpus = Corpus.open(tsv3, progress=False)
    assert corpus.store_dir == others[0].store_dir
    assert [corpus[i] for i in range(len(corpus))] == [others[0][i] for i in range(len(corpus))]
    assert len(set(corpus.ids)) == len(corpus) == 3
    assert [p.name for p in corpus.store_dir.parent.iterdir()] == [corpus.store_dir.name]   # no temp folder left


def test_a_damaged_store_is_rebuilt(tsv3):
    store = Corpus.open(tsv3, progress=False).store_dir
    (store / "meta.json").unlink()     # meta.json is written last: without it the store is not whole
    corpus = Corpus.open(tsv3, progress=False)
    assert (store / "meta.json").exists() and corpus[0] == Corpus(store)[0]


def test_builds_whose_process_died_are_cleared(tsv3, reprolib_cache):
    import socket

    folder, host = reprolib_cache / "corpus", socket.gethostname()
    dead = folder / f"corpus-0123.building-{host}-999999999-x1"     # above any pid_max: no such process
    running = folder / f"corpus-4567.building-{host}-{os.getpid()}-x2"
    elsewhere = folder / "corpus-89ab.building-another-host-999999999-x3"   # a shared cache: not ours to judge
    for path in (dead, running, elsewhere):
        path.mkdir(parents=True)
        (path / "text.bin").write_bytes(b"half")
    corpus = Corpus.open(tsv3, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted([corpus.store_dir.name, running.name, elsewhere.name])


def test_changing_the_source_rebuilds(tsv3):
    first = Corpus.open(tsv3, progress=False)
    assert len(first) == 3
    stat = tsv3.stat()
    with open(tsv3, "a", encoding="utf-8") as f:
        f.write("new\t\tA new passage\n")
    os.utime(tsv3, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # a clearly different mtime
    second = Corpus.open(tsv3, progress=False)
    assert second.store_dir != first.store_dir
    assert len(second) == 4 and second.get("new")["text"] == "A new passage"


def test_same_size_edit_rebuilds(tsv3):
    first = Corpus.open(tsv3, progress=False)
    stat = tsv3.stat()
    tsv3.write_text(tsv3.read_text().replace("Text ten", "Text TEN"))
    os.utime(tsv3, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert tsv3.stat().st_size == stat.st_size
    second = Corpus.open(tsv3, progress=False)
    assert second.get("10")["text"] == "Text TEN"
    assert first.store_dir != second.store_dir


def test_synthetic_corpus(synthetic_corpus):
    assert len(synthetic_corpus) == 2000
    assert synthetic_corpus.positions([str(i) for i in (0, 1999, 2000)]).tolist() == [0, 1999, -1]
    assert isinstance(synthetic_corpus.positions(["5"]), np.ndarray)


def test_scifact_corpus():
    scifact = shared_dataset("beir", "scifact")
    if not (scifact / "corpus.jsonl").exists():
        pytest.skip("scifact corpus.jsonl is absent")
    corpus = Corpus.open(scifact, progress=False)
    assert len(corpus) == 5183
    first = corpus.get("4983")
    assert first["title"].startswith("Microstructural development of human newborn cerebral white matter")
    assert corpus.positions(["4983"]).tolist() == [0]
