"""Prepared corpora: inputs of every format to shards and back, exact round trips, shards, the split,
reading windows from disk against memory, and each bad input as one clear error."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, invoke, shared_file
from minifn import prepare as prep
from minifn import sources
from minifn.corpus import MANIFEST, CorpusError, TokenSequence, open_corpus, read_manifest, verify_corpus
from minifn.data import batches, eval_batches
from minifn.prepare import chunks_exactly, prepare
from minifn.tokenizer import load_tokenizer, train_tokenizer

# Documents that break naive chunking: leading spaces, blank lines, CRLF, tabs, trailing spaces, unicode,
# text with no final newline, an empty document, one of newlines only, and a long one of many lines.
DOCS = [
    "The owl counted the stars.\n",
    "  Leading spaces,\n\n\nblank lines,\r\nCRLF,\tand a tab.  \n  ",
    "ünïcödé, 日本語, emoji 🦉 and no final newline",
    "",
    "\n\n\n",
    "".join(f"{'  ' * (i % 3)}Line {i} of a long document{' ' * (i % 2)}\n" + "\n" * (i % 4 == 0)
            for i in range(400)),
    " x",
]
NONEMPTY = [d for d in DOCS if d]  # an empty document is left out: no ids, so no separator of its own


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small BPE model trained here (byte fallback, identity normalization, as minifn trains them)."""
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text(("The owl counted the stars, twice, and then slept.\n  Indented line here.\n\n" * 40)
                      + "".join(DOCS))
    return load_tokenizer(train_tokenizer([corpus], 400, folder / "small.model"))


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 64 bytes and batches of 300 characters, so every document is cut in many places."""
    monkeypatch.setattr(prep, "PIECE_BYTES", 64)
    monkeypatch.setattr(prep, "BATCH_CHARS", 300)


def write_docs_as_files(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = folder / f"doc{i:02d}.txt"
        path.write_bytes(doc.encode())
        paths.append(path)
    return paths


def stream(corpus):
    parts = [corpus.train[:]] + ([corpus.val[:]] if corpus.val is not None else [])
    return np.concatenate(parts)


def split_documents(ids, separator):
    """The documents of a stream: the runs between separators."""
    cuts = np.flatnonzero(ids == separator)
    return [ids[a:b].tolist() for a, b in zip(np.r_[0, cuts + 1], np.r_[cuts, len(ids)])]


def expected_stream(tok, docs):
    ids = []
    for i, doc in enumerate(d for d in docs if d):
        ids += ([tok.eos_id] if i else []) + tok.encode(doc)
    return ids


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("which", ["mistral", "trained"])
def test_every_document_round_trips_exactly_and_ids_equal_whole_encoding(which, mistral, trained, tmp_path,
                                                                          small_pieces):
    tok = mistral if which == "mistral" else trained
    assert chunks_exactly(tok)
    files = write_docs_as_files(tmp_path / "in", DOCS)
    manifest = prepare(files, tmp_path / "out", tok)
    corpus = open_corpus(manifest.path, tok.sha256, verify=True)
    ids = stream(corpus)
    assert ids.tolist() == expected_stream(tok, DOCS)  # chunked ids are the whole documents' ids
    decoded = [tok.decode(doc) for doc in split_documents(ids, manifest.separator_id)]
    assert decoded == NONEMPTY
    assert manifest.documents == len(NONEMPTY)
    assert [r["documents"] for r in manifest.data["inputs"]] == [int(bool(doc)) for doc in DOCS]
    assert manifest.text_bytes("train") == sum(len(doc.encode()) for doc in DOCS)  # for bits per byte


def test_tinyshakespeare_in_pieces_equals_the_whole_file_encoded_at_once(mistral, tmp_path, monkeypatch):
    path = shared_file("tinyshakespeare.txt")
    monkeypatch.setattr(prep, "PIECE_BYTES", 4096)  # about 270 pieces, 17 batches
    monkeypatch.setattr(prep, "BATCH_CHARS", 1 << 16)
    corpus = open_corpus(prepare([path], tmp_path / "shak", mistral, workers=2).path)
    text = path.read_text()
    ids = corpus.train[:]
    assert ids.tolist() == mistral.encode(text) and mistral.decode(ids) == text


def test_a_model_that_fails_the_chunking_probe_gets_whole_documents(mistral, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "chunks_exactly", lambda tok: False)
    monkeypatch.setattr(prep, "PIECE_BYTES", 64)
    seen = []
    encode = prep._Encoder.__call__
    monkeypatch.setattr(prep._Encoder, "__call__", lambda self, batch: seen.extend(batch) or encode(self, batch))
    files = write_docs_as_files(tmp_path / "in", DOCS)
    corpus = open_corpus(prepare(files, tmp_path / "out", mistral).path)
    assert all(piece.first and piece.last for _, piece in seen) and len(seen) == len(NONEMPTY)
    assert stream(corpus).tolist() == expected_stream(mistral, DOCS)


# ----------------------------------------------------------------------------------------- formats


def test_directory_glob_and_file_inputs(mistral, tmp_path):
    root = tmp_path / "data"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("B text\n")
    (root / "a.md").write_text("A text\n")
    (root / "sub" / "deeper" / "c.txt").write_text("C text\n")
    (root / ".hidden" / "h.txt").write_text("hidden\n")
    (root / "notes.log").write_text("not a data suffix\n")
    files, skipped = sources.expand_inputs([root])
    assert [p.name for p in files] == ["a.md", "b.txt", "c.txt"] and [p.name for p in skipped] == ["notes.log"]
    manifest = prepare([root], tmp_path / "dir", mistral)
    assert manifest.documents == 3 and manifest.data["skipped"] == [str(root / "notes.log")]
    texts = [mistral.decode(d) for d in split_documents(stream(open_corpus(manifest.path)), mistral.eos_id)]
    assert texts == ["A text\n", "B text\n", "C text\n"]
    # globs (sorted, ** recursive), explicit files of any suffix, duplicates read once
    files, _ = sources.expand_inputs([str(root / "**" / "*.txt"), root / "notes.log", root / "b.txt"])
    assert [p.name for p in files] == ["b.txt", "c.txt", "notes.log"]
    manifest = prepare([str(root / "**" / "*.txt"), root / "notes.log"], tmp_path / "glob", mistral)
    assert manifest.documents == 3 and [r["format"] for r in manifest.data["inputs"]] == ["text"] * 3


def test_a_glob_reads_files_in_the_order_their_directory_does(mistral, tmp_path):
    """Globs sorted by the path's text ('a-b/' before 'a/'), directories by its parts ('a/' first), so one
    corpus prepared from DIR and from 'DIR/**/*.txt' had other ids, another split and another digest."""
    root = tmp_path / "data"
    for name in ["a-b/x.txt", "a/y.txt", "a/z/w.txt", "a.txt"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name + "\n")
    by_directory, _ = sources.expand_inputs([root])
    assert sources.expand_inputs([str(root / "**" / "*.txt")])[0] == by_directory
    assert sources.expand_inputs([str(root / "*")])[0] == by_directory
    one = prepare([root], tmp_path / "dir", mistral, val_fraction=0.3)
    other = prepare([str(root / "**" / "*.txt")], tmp_path / "glob", mistral, val_fraction=0.3)
    assert one.content_sha256 == other.content_sha256


@pytest.mark.parametrize("compressed", [False, True], ids=["jsonl", "jsonl.gz"])
def test_jsonl_one_document_per_line(mistral, tmp_path, small_pieces, compressed):
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
    data = ("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n").encode()  # a blank line is skipped
    path = tmp_path / ("docs.jsonl.gz" if compressed else "docs.jsonl")
    path.write_bytes(gzip.compress(data) if compressed else data)
    manifest = prepare([path], tmp_path / "out", mistral, text_field="body")
    ids = stream(open_corpus(manifest.path, verify=True))
    assert ids.tolist() == expected_stream(mistral, DOCS)
    assert manifest.data["inputs"][0]["format"] == "jsonl" and manifest.data["inputs"][0]["documents"] == len(NONEMPTY)


def test_parquet_one_document_per_row(mistral, tmp_path, small_pieces):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), path, row_group_size=2)
    manifest = prepare([path], tmp_path / "out", mistral)
    assert stream(open_corpus(manifest.path)).tolist() == expected_stream(mistral, DOCS)
    with pytest.raises(CorpusError, match="has no column 'body'.*--text-field"):
        prepare([path], tmp_path / "other", mistral, text_field="body")


def test_parquet_without_pyarrow_names_the_extra(mistral, tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusError, match=r"pip install minifn\[parquet\]"):
        prepare([path], tmp_path / "out", mistral)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- shards


def test_tiny_shards_hold_the_same_stream_and_slices_cross_them(mistral, tmp_path, recorded_seed):
    files = write_docs_as_files(tmp_path / "in", DOCS)
    whole = stream(open_corpus(prepare(files, tmp_path / "one", mistral).path))
    manifest = prepare(files, tmp_path / "many", mistral, shard_tokens=7)
    shards = manifest.shards("train")
    assert len(shards) == -(-len(whole) // 7) and all(s.tokens <= 7 for s in shards)
    assert all((manifest.path / s.file).stat().st_size == s.tokens * 2 for s in shards)  # uint16 on disk
    seq = open_corpus(manifest.path).train
    assert len(seq) == len(whole) and np.array_equal(seq[:], whole)
    rng = np.random.default_rng(recorded_seed)
    for a, b in rng.integers(0, len(whole) + 1, size=(200, 2)):
        a, b = sorted((int(a), int(b)))
        assert np.array_equal(seq[a:b], whole[a:b]) and seq[a:b].dtype == np.int64
        assert np.array_equal(seq.view(a, b)[:], whole[a:b])
    assert seq[-1] == whole[-1] and seq[6] == whole[6] and seq[7] == whole[7]


def test_a_window_spanning_two_shards_equals_the_in_memory_window(mistral, tmp_path):
    files = write_docs_as_files(tmp_path / "in", DOCS[:3])
    seq = open_corpus(prepare(files, tmp_path / "c", mistral, shard_tokens=10).path).train
    memory = torch.from_numpy(seq[:])
    x, y = next(batches(seq, 8, 8, 1, start=1))  # window 1: tokens 8..16, from shards 0 and 1
    mx, my = next(batches(memory, 8, 8, 1, start=1))
    assert torch.equal(x, mx) and torch.equal(y, my) and torch.equal(x[0], memory[8:16])


def test_uint32_for_a_vocabulary_over_65536(tmp_path):
    from minifn.corpus import token_dtype

    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ------------------------------------------------------------------------------------------- split


def many_docs(n=60):
    return [f"Document {i}: " + "word " * (5 + (i * 7) % 23) + "\n" for i in range(n)]


def test_the_split_is_whole_documents_at_the_end_fixed_and_disjoint(mistral, tmp_path):
    docs = many_docs()
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    full = stream(open_corpus(prepare([path], tmp_path / "all", mistral).path))
    first = prepare([path], tmp_path / "a", mistral, val_fraction=0.2)
    again = prepare([path], tmp_path / "b", mistral, val_fraction=0.2)
    assert first.split == again.split and first.split["rule"] == "documents"
    assert [s.sha256 for s in first.shards("val")] == [s.sha256 for s in again.shards("val")]
    assert first.content_sha256 == again.content_sha256 != read_manifest(tmp_path / "all").content_sha256
    corpus = open_corpus(first.path, verify=True)
    train, val = corpus.train[:], corpus.val[:]
    assert np.array_equal(np.concatenate([train, val]), full)  # disjoint, and together the whole corpus
    assert train[-1] == mistral.eos_id and val[0] != mistral.eos_id  # the cut is at a document start
    held = [mistral.decode(d) for d in split_documents(val, mistral.eos_id)]
    assert held == docs[-len(held):] and first.split["val_documents"] == len(held)
    assert first.text_bytes("val") == sum(len(d.encode()) for d in held)
    assert first.text_bytes("train") == sum(len(d.encode()) for d in docs[: -len(held)])
    target = round(0.2 * len(full))
    assert target <= len(val) <= 2 * target


def test_val_tokens_and_the_tail_of_a_single_document(mistral, tmp_path):
    path = shared_file("mini-owl.md")
    total = len(mistral.encode(path.read_text()))
    manifest = prepare([path], tmp_path / "owl", mistral, val_tokens=50)  # one document: the split is its tail
    assert manifest.split["rule"] == "tail" and manifest.split_tokens("val") == 50
    assert manifest.split_tokens("train") == total - 50 and manifest.split["val_documents"] == 0
    train_text = mistral.decode(mistral.encode(path.read_text())[:-50])
    assert manifest.text_bytes("train") == len(train_text.encode())
    assert manifest.text_bytes("train") + manifest.text_bytes("val") == len(path.read_bytes())
    with pytest.raises(CorpusError, match="leaves fewer than 2 tokens"):
        prepare([path], tmp_path / "too_much", mistral, val_tokens=total)
    with pytest.raises(CorpusError, match="not both"):
        prepare([path], tmp_path / "both", mistral, val_tokens=10, val_fraction=0.1)


# ---------------------------------------------------------------------------- batches from disk


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_from_shards_equal_batches_from_memory(mistral, tmp_path, world_size, recorded_seed):
    docs = many_docs(40)
    files = write_docs_as_files(tmp_path / "in", docs)
    corpus = open_corpus(prepare(files, tmp_path / "c", mistral, shard_tokens=97, val_fraction=0.25).path)
    for disk in (corpus.train, corpus.val):
        memory = torch.from_numpy(disk[:])
        for epoch in range(3):
            for rank in range(world_size):
                kw = dict(epoch=epoch, shuffle=True, seed=recorded_seed, pad_id=mistral.pad_id, rank=rank,
                          world_size=world_size)
                from_disk = list(batches(disk, 16, 8, 3, **kw))
                from_memory = list(batches(memory, 16, 8, 3, **kw))
                assert len(from_disk) == len(from_memory) > 3
                for (a, b), (c, d) in zip(from_disk, from_memory):
                    assert torch.equal(a, c) and torch.equal(b, d)
                resumed = list(batches(disk, 16, 8, 3, start=3, **kw))
                assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, from_disk[3:]))
                assert len(resumed) == len(from_disk) - 3
        for (a, b), (c, d) in zip(eval_batches(disk, 16, 4, 5), eval_batches(memory, 16, 4, 5)):
            assert torch.equal(a, c) and torch.equal(b, d)


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture
def prepared(mistral, tmp_path):
    files = write_docs_as_files(tmp_path / "in", DOCS)
    return prepare(files, tmp_path / "corpus", mistral, shard_tokens=50, val_fraction=0.3).path


def edit_manifest(path, change):
    data = json.loads((path / MANIFEST).read_text())
    change(data)
    (path / MANIFEST).write_text(json.dumps(data))


def shrink_first_shard(data):
    """A lie that adds up: the first shard, its split and the corpus all one token shorter than the file."""
    data["splits"]["train"]["shards"][0].update(tokens=49, bytes=98)
    data["splits"]["train"]["tokens"] -= 1
    data["tokens"] -= 1


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_a_different_tokenizer_is_refused(prepared, trained):
    with pytest.raises(CorpusError, match="was prepared with tokenizer mistral .* not the one in use") as e:
        open_corpus(prepared, trained.sha256)
    assert one_line(e)


def test_a_truncated_shard_is_refused(prepared):
    shard = prepared / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(CorpusError, match=f"shard {shard} has 98 bytes but the manifest says 50 tokens") as e:
        open_corpus(prepared)
    assert one_line(e)


def test_a_missing_manifest_or_corpus_is_refused(prepared, tmp_path):
    (prepared / MANIFEST).unlink()
    with pytest.raises(CorpusError, match="has no manifest.json: not a prepared corpus") as e:
        open_corpus(prepared)
    assert one_line(e)
    with pytest.raises(CorpusError, match="does not exist"):
        open_corpus(tmp_path / "nowhere")


@pytest.mark.parametrize("lie,message", [
    (lambda d: shrink_first_shard(d), "has 100 bytes but the manifest says 49 tokens"),
    (lambda d: d["splits"]["train"].update(tokens=1), "says the train split has 1 tokens but its shards hold"),
    (lambda d: d.update(tokens=d["tokens"] + 1), "says the corpus has .* tokens but its splits hold"),
    (lambda d: d["splits"]["val"]["shards"][0].update(bytes=3), "holds .* tokens in 3 bytes"),
    (lambda d: d.update(version=99), "has format version 99"),
    (lambda d: d.update(dtype="int8"), "has dtype 'int8'"),
])
def test_a_manifest_that_lies_is_refused(prepared, lie, message):
    edit_manifest(prepared, lie)
    with pytest.raises(CorpusError, match=message) as e:
        open_corpus(prepared)
    assert one_line(e)


@pytest.mark.parametrize("lie,message", [
    (lambda d: [s.update(tokens=float(s["tokens"]), bytes=float(s["bytes"])) for s in d["splits"]["train"]["shards"]],
     "has a malformed shard entry in the train split"),  # was a TypeError deep in the reader
    (lambda d: d["splits"]["train"]["shards"].__setitem__(1, dict(d["splits"]["train"]["shards"][0])),
     "lists shard train-00000.bin twice"),  # sizes match, so it silently read the first shard twice
    (lambda d: d["splits"].update(val={"tokens": 0, "shards": [], "text_bytes": 0}) or d.update(
        tokens=d["splits"]["train"]["tokens"]), "has a val split of 0 token"),  # training failed as a bug
    (lambda d: d["splits"]["val"].update(text_bytes=-5), "no valid shard list, token count and text bytes"),
    (lambda d: d.update(documents=True), "has no valid 'documents' field"),
])
def test_a_manifest_with_counts_of_the_wrong_kind_is_refused(prepared, lie, message):
    edit_manifest(prepared, lie)
    with pytest.raises(CorpusError, match=message) as e:
        open_corpus(prepared)
    assert one_line(e)


def test_an_id_outside_the_vocabulary_is_one_line_when_a_window_reads_it(prepared, mistral):
    """A shard damaged in place (same size, so opening it passes) stops at the first read of the bad id, with
    the shard named, not as a token-range failure inside the train step (reported as a bug in minifn)."""
    shard = prepared / "train-00001.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[7], ids[9] = 40000, 50000  # the message names the first, not the largest
    ids.tofile(shard)
    corpus = open_corpus(prepared, mistral.sha256)
    assert corpus.train[:50].max() < mistral.vocab_size  # the first shard is fine
    with pytest.raises(CorpusError, match=f"{shard} holds id 40000 at token 7, outside the vocabulary of 32000") as e:
        list(batches(corpus.train, 8, 4, 2))
    assert one_line(e)


def test_a_whole_split_scan_keeps_one_block_resident(mistral, tmp_path, monkeypatch):
    """blocks() mapped each shard whole, so a scan (prepare's byte count and split, verify) held every page of a
    shard of up to --shard-tokens ids in its resident memory by the end; now one block's at a time."""
    statm = "/proc/self/statm"
    if not os.path.exists(statm):
        pytest.skip("needs /proc")
    path = tmp_path / "ids.bin"
    np.arange(1 << 21, dtype=np.uint16).tofile(path)  # 4 MB
    seq = TokenSequence.from_files([(path, 1 << 21)], np.uint16)
    page = os.sysconf("SC_PAGE_SIZE")

    def resident():
        with open(statm) as f:
            return int(f.read().split()[1]) * page

    start, grown, total = resident(), 0, 0
    for block in seq.blocks(1 << 14):  # 32 KB blocks
        total += int(block.sum())
        grown = max(grown, resident() - start)
    assert total == sum(range(1 << 16)) * 32
    assert grown < (1 << 20), f"resident memory grew by {grown} bytes over a 4 MB scan"


def test_verification_catches_document_counts_changed_ids_and_ids_outside_the_vocabulary(prepared):
    edit_manifest(prepared, lambda d: d.update(documents=d["documents"] + 1))
    corpus = open_corpus(prepared)  # the cheap checks pass
    with pytest.raises(CorpusError, match=f"says {len(NONEMPTY) + 1} documents but the shards hold {len(NONEMPTY)}"):
        verify_corpus(corpus)
    edit_manifest(prepared, lambda d: d.update(documents=d["documents"] - 1))
    shard = prepared / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[3] = 40000
    ids.tofile(shard)
    with pytest.raises(CorpusError, match="does not match its sha256"):
        open_corpus(prepared, verify=True)
    edit_manifest(prepared, lambda d: d["splits"]["train"]["shards"][0].update(sha256=_sha(shard)))
    with pytest.raises(CorpusError, match="holds id 40000, outside the vocabulary of 32000"):
        open_corpus(prepared, verify=True)


def _sha(path):
    from minifn.tokenizer import sha256_file

    return sha256_file(path)


def test_an_existing_output_is_refused_unless_a_corpus_and_overwrite(mistral, tmp_path, prepared):
    story = shared_file("mini-owl.md")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(CorpusError, match="exists and is not a prepared corpus"):
        prepare([story], tmp_path / "mine", mistral, overwrite=True)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    with pytest.raises(CorpusError, match="already a prepared corpus; pass --overwrite"):
        prepare([story], prepared, mistral)
    before = read_manifest(prepared)
    after = prepare([story], prepared, mistral, overwrite=True)
    assert before.documents == len(NONEMPTY) and after.documents == 1 and not (prepared / "val-00000.bin").exists()
    (tmp_path / "empty").mkdir()
    assert prepare([story], tmp_path / "empty", mistral).documents == 1  # an empty folder is filled
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("content,name,message", [
    (None, "missing.txt", "input .*missing.txt does not exist"),
    (b"\x00\x01binary", "bin.dat", "looks binary"),
    (b"caf\xe9 au lait", "latin1.txt", r"is not UTF-8 text \(bad byte at offset 3\)"),
    (b'{"text": "ok"}\n{"text": \n', "bad.jsonl", r"bad.jsonl:2 is not valid JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', "field.jsonl", r"field.jsonl:2 has no text field 'text'"),
    (b"\x1f\x8b\x08\x00 not gzip", "trunc.jsonl.gz", "is not a complete gzip file"),
    (b"not parquet at all", "bad.parquet", "is not a Parquet file"),
    (b"", "empty.txt", "hold no text"),  # not a corpus of one separator
    (b'{"text": ""}\n', "empty.jsonl", "hold no text"),
])
def test_bad_inputs_are_one_line_errors_and_leave_nothing(mistral, tmp_path, content, name, message):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as e:
        prepare([path], tmp_path / "out", mistral)
    assert one_line(e) and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left
    with pytest.raises(CorpusError, match="matches no files"):
        prepare([str(tmp_path / "*.nothing")], tmp_path / "out", mistral)


def test_an_interrupted_prepare_leaves_nothing_and_stale_folders_are_removed(mistral, tmp_path):
    story = shared_file("mini-owl.md")

    def interrupt(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([story], tmp_path / "out", mistral, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.prepare-{dead.pid}-abc"
    (stale / "part-00000.bin").parent.mkdir()
    (stale / "part-00000.bin").write_bytes(b"\x01\x00")
    prepare([story], tmp_path / "out", mistral)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_reports_bytes_documents_and_tokens(mistral, tmp_path):
    files = write_docs_as_files(tmp_path / "in", DOCS)
    reports = []
    manifest = prepare(files, tmp_path / "out", mistral, progress=reports.append)
    total = sum(len(d.encode()) for d in DOCS)
    assert reports[0].bytes_read == 0 and reports[-1].bytes_read == reports[-1].bytes_total == total
    assert reports[-1].tokens == manifest.tokens and reports[-1].documents == len(NONEMPTY)
    assert all(a.bytes_read <= b.bytes_read and a.tokens <= b.tokens for a, b in zip(reports, reports[1:]))


@pytest.mark.slow
def test_a_killed_prepare_leaves_nothing_that_looks_complete(tmp_path):
    story = shared_file("mini-owl.md")
    script = ("import sys, time; from minifn.prepare import prepare; from minifn.tokenizer import load_tokenizer; "
              "prepare([sys.argv[1]], sys.argv[2], load_tokenizer(), progress=lambda p: p.tokens and time.sleep(60))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(story), str(tmp_path / "out")], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".out.prepare-*/part-00000.bin")):
        time.sleep(0.1)
    assert any(tmp_path.glob(".out.prepare-*/part-00000.bin")), "the prepare never started writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    with pytest.raises(CorpusError, match="does not exist"):
        open_corpus(tmp_path / "out")


@pytest.mark.slow
def test_a_sigterm_to_cli_prepare_removes_its_temporary_folder(tmp_path):
    """SIGTERM (what a job scheduler sends) cleans up as Ctrl-C does, where the default action would leave
    the hidden folder behind; the exit status is the shell's 143."""
    story = shared_file("mini-owl.md")
    script = ("import sys, time, minifn.prepare as p; real = p.prepare; "
              "p.prepare = lambda *a, **k: real(*a, **{**k, 'progress': lambda r: r.tokens and time.sleep(60)}); "
              "sys.argv = ['minifn', 'prepare', sys.argv[1], '-o', sys.argv[2]]; "
              "from minifn.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", script, str(story), str(tmp_path / "out")], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".out.prepare-*/part-00000.bin")):
        time.sleep(0.1)
    assert any(tmp_path.glob(".out.prepare-*/part-00000.bin")), "the prepare never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_summary_and_errors(tmp_path):
    story = shared_file("mini-owl.md")
    result = invoke("prepare", story, "--output", tmp_path / "c", "--val-tokens", 40, "--shard-tokens", 100)
    assert result.exit_code == 0, result.output
    assert "Prepared 1 documents from 1 file(s)" in result.output and "40 validation (the last tokens)" in result.output
    assert "MB/s" in result.output and str(tmp_path / "c") in result.output
    assert "\r" not in result.output  # no progress bar when stderr is not a terminal
    for args, message in [
        ([story, "--output", tmp_path / "c"], "already a prepared corpus; pass --overwrite"),
        ([tmp_path / "nope.txt", "--output", tmp_path / "d"], "does not exist"),
        ([story, "--output", tmp_path / "d", "--val-tokens", 5, "--val-fraction", 0.1], "not both"),
        ([story, "--output", tmp_path / "d", "--tokenizer", tmp_path / "none.model"], "does not exist"),
    ]:
        bad = invoke("prepare", *args)
        assert bad.exit_code == 1 and message in bad.output, bad.output
        assert len(bad.output.strip().splitlines()) == 1 and bad.output.startswith("Error: ")
    again = invoke("prepare", story, "--output", tmp_path / "c", "--overwrite")
    assert again.exit_code == 0 and "(the last tokens)" not in again.output


def test_token_sequence_from_arrays_and_its_limits():
    seq = TokenSequence.from_arrays(np.arange(5, dtype=np.uint16), np.array([], dtype=np.uint16),
                                    np.arange(5, 9, dtype=np.uint16))
    assert len(seq) == 9 and seq[3:7].tolist() == [3, 4, 5, 6] and seq[-1] == 8 and list(seq) == list(range(9))
    assert seq.view(2, 6)[1:3].tolist() == [3, 4] and len(seq.view(7, 2)) == 0
    with pytest.raises(IndexError):
        seq[9]
    with pytest.raises(ValueError, match="step 1"):
        seq[::2]


def test_open_dataset_takes_a_corpus_directory_or_a_text_file(mistral, prepared, tmp_path, monkeypatch):
    from minifn.corpus import open_dataset

    monkeypatch.setenv("MINIFN_CACHE_DIR", str(tmp_path / "cache"))
    story = shared_file("mini-owl.md")
    from_dir = open_dataset(prepared, mistral)
    from_file = open_dataset(story, mistral)
    assert from_dir.val is not None and from_file.val is None
    assert from_file.train[:].tolist() == mistral.encode(story.read_text())
    assert from_file.path.parent == tmp_path / "cache" / "tokens"


MANY_SHARDS = """
import os, resource, sys
from minifn.corpus import open_corpus
from minifn.data import batches
from minifn.prepare import prepare
from minifn.tokenizer import load_tokenizer
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
manifest = prepare([sys.argv[1]], sys.argv[2], load_tokenizer(), shard_tokens=2, val_fraction=0.2)
corpus = open_corpus(manifest.path)
shards = len(corpus.manifest.shards("train"))
assert shards > 100, shards
rows = sum(len(x) for x, _ in batches(corpus.train, 16, 8, 4, shuffle=True))
print("read", shards, "shards,", rows, "windows")
"""


def test_a_corpus_of_more_shards_than_open_files_allowed_prepares_and_reads(tmp_path):
    """Shards are opened per read, not held open: over 100 shards of 2 tokens with room for 40 more open files
    than the process holds when it starts."""
    story = shared_file("mini-owl.md")
    result = subprocess.run([sys.executable, "-c", MANY_SHARDS, str(story), str(tmp_path / "c")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("read "), result.stdout + result.stderr
