"""Prepared corpora on disk: the layout, the manifest and its checks, and token sequences read from shards.

A prepared corpus (written by `minifn.prepare.prepare`, `minifn prepare`) is a directory:

    manifest.json        what is here and how it was made: format, tokenizer, dtype, shards, split, inputs
    train-00000.bin ...  raw token ids, uint16 where the vocabulary fits, else uint32 (np.memmap-able)
    val-00000.bin ...    the validation split, when one was asked for

The shards of a split, in order, are one stream of ids in which the documents are joined by the tokenizer's
EOS id: a corpus of one document is exactly that document's ids. manifest.json is written last and the
directory appears under its name only when complete, so a directory with a manifest is a finished one.
`open_corpus` checks the manifest against the files (sizes, counts, tokenizer) before anything is read;
`verify_corpus` also reads every id (hashes, vocabulary range, document count).

`Corpus.train` / `Corpus.val` are `TokenSequence`s: len() and slices like an array, read from the shard
files per slice (with pread, so a long run's resident memory does not grow with the pages it touched),
never loaded whole. Whole-split scans go through np.memmap views a block at a time.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "minifn-corpus"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SCAN_BLOCK = 1 << 22  # tokens per block when a whole split is scanned


class CorpusError(ValueError):
    """A prepared corpus (or an input to one) that cannot be used; the message names the file and why."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


# ------------------------------------------------------------------------------------------ manifest


@dataclass(frozen=True)
class Shard:
    file: str
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """manifest.json of the corpus in `path`, checked for shape and internal consistency."""

    path: Path
    data: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"])

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def separator_id(self) -> int:
        return self.data["separator_id"]

    @property
    def documents(self) -> int:
        return self.data["documents"]

    @property
    def tokens(self) -> int:
        return self.data["tokens"]

    @property
    def input_bytes(self) -> int:
        return sum(i["bytes"] for i in self.data["inputs"])

    @property
    def split(self) -> dict:
        return self.data["split"]

    def split_tokens(self, split: str) -> int:
        return self.data["splits"][split]["tokens"]

    def text_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text the split's ids decode to (the denominator of bits per byte)."""
        return self.data["splits"][split]["text_bytes"]

    def shards(self, split: str) -> list[Shard]:
        return [Shard(**s) for s in self.data["splits"][split]["shards"]]

    @property
    def content_sha256(self) -> str:
        """A digest of the ids and the split (shard hashes in order, tokenizer, cut): the data's identity,
        for a checkpoint to record. Preparing the same inputs the same way gives the same digest."""
        import hashlib

        shards = {name: [s["sha256"] for s in entry["shards"]] for name, entry in self.data["splits"].items()}
        content = {"tokenizer": self.tokenizer["sha256"], "split": self.split.get("cut"), "shards": shards}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _require(condition: bool, where: Path, what: str) -> None:
    if not condition:
        raise CorpusError(f"{where} {what}; prepare the corpus again (minifn prepare)")


def _count(value) -> bool:
    """A count a manifest may hold: a whole number, at least 0 (not a bool, not 3.0)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest(data, where: Path) -> None:
    """Shape and arithmetic of a manifest (not yet the files): every count adds up."""
    _require(isinstance(data, dict) and data.get("format") == FORMAT, where, f"is not a {FORMAT} manifest")
    _require(data.get("version") == VERSION, where, f"has format version {data.get('version')!r}, "
             f"this minifn reads version {VERSION}")
    for key, kind in [("tokenizer", dict), ("dtype", str), ("separator_id", int), ("documents", int),
                      ("tokens", int), ("splits", dict), ("split", dict), ("inputs", list)]:
        _require(isinstance(data.get(key), kind) and (kind is not int or _count(data[key])), where,
                 f"has no valid '{key}' field")
    tok = data["tokenizer"]
    _require(isinstance(tok.get("sha256"), str) and _count(tok.get("vocab_size")) and tok["vocab_size"] > 0, where,
             "has no tokenizer sha256 and vocab_size")
    fits = data["dtype"] in ("uint16", "uint32") and (
        token_dtype(tok["vocab_size"]).itemsize <= np.dtype(data["dtype"]).itemsize)
    _require(fits, where, f"has dtype {data['dtype']!r}, which cannot hold the vocabulary")
    _require(set(data["splits"]) <= set(SPLITS) and "train" in data["splits"], where, "has unknown or missing splits")
    total, files = 0, set()
    for split, entry in data["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        _require(isinstance(shards, list) and _count(entry.get("tokens")) and _count(entry.get("text_bytes")),
                 where, f"has no valid shard list, token count and text bytes for the {split} split")
        for shard in shards:
            _require(isinstance(shard, dict) and set(shard) == {"file", "tokens", "bytes", "sha256"}
                     and isinstance(shard["file"], str) and _count(shard["tokens"]) and _count(shard["bytes"]),
                     where, f"has a malformed shard entry in the {split} split")
            _require(Path(shard["file"]).name == shard["file"] and shard["file"].endswith(".bin"), where,
                     f"names a shard outside the corpus ({shard['file']!r})")
            _require(shard["file"] not in files, where, f"lists shard {shard['file']} twice")
            files.add(shard["file"])
            _require(shard["bytes"] == shard["tokens"] * np.dtype(data["dtype"]).itemsize, where,
                     f"says {shard['file']} holds {shard['tokens']} tokens in {shard['bytes']} bytes")
        counted = sum(s["tokens"] for s in shards)
        _require(counted == entry["tokens"], where,
                 f"says the {split} split has {entry['tokens']} tokens but its shards hold {counted}")
        _require(split == "train" or counted >= 2, where,
                 f"has a {split} split of {counted} token(s), fewer than the 2 a score needs")
        total += counted
    _require(total == data["tokens"], where, f"says the corpus has {data['tokens']} tokens but its splits hold {total}")
    _require(data["documents"] >= 1 or total == 0, where, "counts no documents")


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The checked manifest of a prepared corpus, or a CorpusError that says what is missing or wrong."""
    directory = Path(directory)
    if not directory.exists():
        raise CorpusError(f"prepared corpus {directory} does not exist")
    if not directory.is_dir():
        raise CorpusError(f"{directory} is not a prepared corpus directory (it is a file)")
    path = directory / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{directory} has no {MANIFEST}: not a prepared corpus, or its prepare did not finish; "
                          "run minifn prepare")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorpusError(f"{path} cannot be read as JSON ({str(e).splitlines()[0][:80]})") from None
    _check_manifest(data, path)
    return Manifest(directory, data)


def is_prepared(directory: str | os.PathLike) -> bool:
    """Whether directory holds a finished prepared corpus (a readable manifest of this format)."""
    try:
        read_manifest(directory)
    except CorpusError:
        return False
    return True


# -------------------------------------------------------------------------------- token sequences


class _ShardFile:
    """One shard file, read by position with pread (no mapping kept, so resident memory does not grow
    with the pages a long run has touched; the kernel's page cache does the caching). Opened per read, not
    held open: a corpus of thousands of shards would otherwise exceed the usual limit of 1024 open files,
    and an open and a close cost microseconds against a step's milliseconds."""

    def __init__(self, path: Path, dtype: np.dtype, tokens: int, vocab_size: int | None = None):
        self.path, self.dtype, self.tokens, self.vocab_size = path, dtype, tokens, vocab_size

    def __len__(self) -> int:
        return self.tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        size = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, (stop - start) * size, start * size)
        finally:
            os.close(fd)
        if len(data) != (stop - start) * size:
            raise CorpusError(f"{self.path} is shorter than its manifest says (changed after it was opened?)")
        ids = np.frombuffer(data, dtype=self.dtype)
        if self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            at = int(np.argmax(ids >= self.vocab_size))  # the first one
            raise CorpusError(f"{self.path} holds id {int(ids[at])} at token {start + at}, outside the vocabulary "
                              f"of {self.vocab_size}: it was changed or damaged; prepare the corpus again")
        return ids

    def array(self, start: int, stop: int) -> np.ndarray:
        """Tokens start..stop-1 as a memory map of just those (unmapped when dropped, so a scan of a whole
        shard keeps one block's pages resident, not the shard's)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize,
                         shape=(stop - start,))


class _InMemory:
    """An in-memory array in place of a shard (for small data and tests)."""

    def __init__(self, array: np.ndarray):
        self.data = np.asarray(array).reshape(-1)

    def __len__(self) -> int:
        return len(self.data)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]

    def array(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]


class TokenSequence:
    """The token ids of a split: its shards end to end, read per slice and never all at once.

    len(seq) is the token count; seq[a:b] is an int64 numpy array (it may span shards); seq[i] an int;
    seq.view(a, b) the same tokens a..b-1 as a sequence, without copying anything."""

    def __init__(self, parts: list, start: int = 0, stop: int | None = None):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
        self.start, self.stop = start, self.offsets[-1] if stop is None else stop

    @classmethod
    def from_arrays(cls, *arrays) -> TokenSequence:
        return cls([_InMemory(a) for a in arrays if len(a)])

    @classmethod
    def from_files(cls, files: list[tuple[Path, int]], dtype) -> TokenSequence:
        """Raw id files given as (path, token count), end to end (no manifest: for writers)."""
        return cls([_ShardFile(Path(path), np.dtype(dtype), n) for path, n in files if n])

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"TokenSequence({len(self)} tokens in {len(self.parts)} part(s))"

    def view(self, start: int, stop: int | None = None) -> TokenSequence:
        start, stop, _ = slice(start, stop).indices(len(self))
        return TokenSequence(self.parts, self.start + start, self.start + max(start, stop))

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("a TokenSequence is sliced with step 1 only")
            return self._read(self.start + start, self.start + max(start, stop))
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} is outside a sequence of {len(self)}")
        return int(self._read(self.start + index, self.start + index + 1)[0])

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Absolute tokens start..stop-1 as one int64 array, from as many parts as they span."""
        pieces, at = [], start
        part = bisect.bisect_right(self.offsets, at) - 1
        while at < stop:
            begin = self.offsets[part]
            end = min(stop, self.offsets[part + 1])
            pieces.append(self.parts[part].read(at - begin, end - begin))
            at, part = end, part + 1
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return pieces[0].astype(np.int64) if len(pieces) == 1 else np.concatenate(pieces).astype(np.int64)

    def __iter__(self):
        for at in range(0, len(self), SCAN_BLOCK):
            yield from self[at : at + SCAN_BLOCK].tolist()

    def blocks(self, size: int = SCAN_BLOCK):
        """The sequence as consecutive numpy arrays in the shards' dtype (a memory map per block), for whole-split
        scans."""
        for part, begin, end in zip(self.parts, self.offsets, self.offsets[1:]):
            lo, hi = max(begin, self.start), min(end, self.stop)
            for at in range(lo, hi, size):
                yield part.array(at - begin, min(hi, at + size) - begin)

    def astype(self, dtype) -> np.ndarray:
        """Every token in one in-memory array: a full copy, for small data and older callers only."""
        return self[:].astype(dtype)


# ------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus opened for reading: its manifest and one token sequence per split (val may be None)."""

    path: Path
    manifest: Manifest
    train: TokenSequence
    val: TokenSequence | None

    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer["vocab_size"]


def _open_split(manifest: Manifest, split: str) -> TokenSequence | None:
    if split not in manifest.data["splits"]:
        return None
    parts = []
    for shard in manifest.shards(split):
        path = manifest.path / shard.file
        if not path.is_file():
            raise CorpusError(f"shard {path} is missing; prepare the corpus again (minifn prepare)")
        size = path.stat().st_size
        if size != shard.bytes:
            raise CorpusError(f"shard {path} has {size} bytes but the manifest says {shard.tokens} tokens "
                              f"({shard.bytes} bytes): truncated or changed; prepare the corpus again")
        if shard.tokens:
            parts.append(_ShardFile(path, manifest.dtype, shard.tokens, manifest.tokenizer["vocab_size"]))
    return TokenSequence(parts)


def open_corpus(directory: str | os.PathLike, tokenizer_sha256: str | None = None, *, vocab_size: int | None = None,
                verify: bool = False) -> Corpus:
    """Open a prepared corpus after checking its manifest against the shard files (and against the
    tokenizer, when its sha256 and vocab_size are given). verify=True also reads every id (see verify_corpus)."""
    manifest = read_manifest(directory)
    tok = manifest.tokenizer
    if tokenizer_sha256 is not None and tok["sha256"] != tokenizer_sha256:
        raise CorpusError(f"{manifest.path} was prepared with tokenizer {tok.get('name')} (sha256 "
                          f"{tok['sha256'][:12]}), not the one in use (sha256 {tokenizer_sha256[:12]}); "
                          f"pass --tokenizer {tok.get('name')} to use it as prepared, or prepare it again")
    if vocab_size is not None and tok["vocab_size"] != vocab_size:  # the same model file: the manifest was edited
        raise CorpusError(f"{manifest.path}/{MANIFEST} says a vocabulary of {tok['vocab_size']} but its tokenizer "
                          f"has {vocab_size}: it was changed; prepare the corpus again")
    corpus = Corpus(manifest.path, manifest, _open_split(manifest, "train"), _open_split(manifest, "val"))
    if verify:
        verify_corpus(corpus)
    return corpus


def open_dataset(path: str | os.PathLike, tokenizer) -> Corpus:
    """What --dataset names: a prepared corpus directory (checked against the tokenizer), or a text file,
    which goes through the token cache (prepared as one document, no split), so both take one data path."""
    if Path(path).is_dir():
        return open_corpus(path, tokenizer.sha256, vocab_size=tokenizer.vocab_size)
    from minifn.tokenizer import encode_file

    return encode_file(tokenizer, path).corpus


def verify_corpus(corpus: Corpus) -> None:
    """Read every shard: its sha256 matches the manifest, every id is inside the vocabulary, and the
    separators add up to the manifest's document count. One pass over the files, a block at a time."""
    from minifn.tokenizer import sha256_file

    manifest = corpus.manifest
    separators = 0
    for split in manifest.data["splits"]:
        for shard in manifest.shards(split):
            path = corpus.path / shard.file
            if sha256_file(path) != shard.sha256:
                raise CorpusError(f"shard {path} does not match its sha256 in the manifest: it was changed; "
                                  "prepare the corpus again")
        sequence = corpus.train if split == "train" else corpus.val
        for block in sequence.blocks():
            if block.size and int(block.max()) >= corpus.vocab_size:
                raise CorpusError(f"{corpus.path} holds id {int(block.max())}, outside the vocabulary of "
                                  f"{corpus.vocab_size}; prepare the corpus again")
            separators += int(np.count_nonzero(block == manifest.separator_id))
    if separators + 1 != manifest.documents:
        raise CorpusError(f"{corpus.path}/{MANIFEST} says {manifest.documents} documents but the shards hold "
                          f"{separators + 1}; prepare the corpus again")
