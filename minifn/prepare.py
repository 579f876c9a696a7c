"""`prepare`: text files in, a prepared corpus out (token shards and a manifest, laid out as minifn.corpus says).

Streaming, in bounded memory: documents are read in pieces cut at line starts (minifn.sources), pieces are
gathered into batches of a few MB of text, each batch is encoded by sentencepiece on `workers` threads (it
releases the GIL) while the next batch is read, and the ids go straight into shard files. Two batches are
in memory at a time, whatever the size of the input.

Chunking is exact. SentencePiece adds a dummy-prefix space to every text it encodes, so a piece that
continues a document is encoded as "\\n" + piece and the ids of that "\\n" are dropped. No vocabulary piece
contains a newline (the trainer reads its text line by line), so no id spans a line start, and the ids
equal those of the whole document encoded at once. `chunks_exactly` checks this for the model in use; a
model that fails it (one that normalizes newlines away) is given whole documents instead.

Documents are joined by the tokenizer's EOS id (a separator between documents, as nanoGPT's EOT): the
ids of a one-document corpus are exactly that document's ids, and a model learns to end a text with EOS,
where `minifn generate` stops. An empty document (an empty file, a JSONL text of "") is left out,
rather than becoming a second separator in a row.

The validation split is the last whole documents that hold the requested tokens; when that would take
more than twice as many (few, long documents: a single text file is one document), it is the last tokens
instead. Holding out the end keeps validation documents unseen as a whole (no neighbouring chunk of them
in training), makes the split one cut that a backward scan finds after streaming, and is what nanoGPT
does for Shakespeare; corpora that come in no particular order (web crawls) are already shuffled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minifn.corpus import (
    FORMAT,
    MANIFEST,
    SCAN_BLOCK,
    VERSION,
    CorpusError,
    Manifest,
    TokenSequence,
    is_prepared,
    read_manifest,
    shard_name,
    token_dtype,
)
from minifn.files import check_output_location, fsync_dir
from minifn.sources import PIECE_BYTES, Piece, expand_inputs, file_format, read_pieces
from minifn.tokenizer import Tokenizer, sha256_file

BATCH_CHARS = 1 << 22  # text per sentencepiece call (at least two pieces per thread, to keep every thread busy)
SHARD_TOKENS = 100_000_000


@dataclass(frozen=True)
class PrepareProgress:
    bytes_read: int
    bytes_total: int
    documents: int
    tokens: int
    seconds: float


# ---------------------------------------------------------------------------------------- encoding


def chunks_exactly(tokenizer: Tokenizer) -> bool:
    """Whether encoding a text in pieces cut at line starts gives the ids of encoding it whole."""
    sp = tokenizer.sp
    if any("\n" in sp.id_to_piece(i) for i in range(sp.vocab_size())):
        return False
    probe = "The owl,\n  counted\n\nstars ünïcödé \r\n\tand\n slept.\n \n"
    lines = probe.splitlines(keepends=True)
    encoder = _Encoder(tokenizer, 1, np.dtype(np.int64), tokenizer.eos_id)
    pieces = [(0, Piece(line, i == 0, i == len(lines) - 1, 0)) for i, line in enumerate(lines)]
    try:
        return encoder(pieces).tolist() == sp.encode(probe)
    except RuntimeError:
        return False


class _Encoder:
    """A batch of (document index, piece) to one id array: pieces encoded together on `workers` threads,
    continuations without their dummy prefix, the separator before every document but the first."""

    def __init__(self, tokenizer: Tokenizer, workers: int, dtype: np.dtype, separator: int):
        self.sp, self.workers, self.dtype, self.separator = tokenizer.sp, workers, dtype, separator
        self.newline = tokenizer.sp.encode("\n")

    def __call__(self, batch: list[tuple[int, Piece]]) -> np.ndarray:
        texts = [piece.text if piece.first else "\n" + piece.text for _, piece in batch]
        encoded = self.sp.encode(texts, num_threads=self.workers)
        skip = len(self.newline)
        ids = []
        for (document, piece), piece_ids in zip(batch, encoded):
            if piece.first:
                if document:
                    ids.append(self.separator)
                ids += piece_ids
            else:
                if piece_ids[:skip] != self.newline:
                    raise RuntimeError(f"a line-start piece did not encode after {self.newline} as expected")
                ids += piece_ids[skip:]
        return np.array(ids, dtype=self.dtype)


def decoded_bytes_table(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per id: the UTF-8 bytes it decodes to inside a text, and whether a document's dummy-prefix space
    (which decoding drops) sits at its start. Sums over a split give the bytes of its text, exactly."""
    sp = tokenizer.sp
    lengths = np.zeros(sp.vocab_size(), dtype=np.int64)
    spaced = np.zeros(sp.vocab_size(), dtype=bool)
    dummy_prefix = bool(sp.encode("a")) and sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")
    for i in range(sp.vocab_size()):
        if sp.is_byte(i):
            lengths[i] = 1
        elif sp.is_unknown(i):
            lengths[i] = len(sp.decode([i]).encode())
        elif not sp.is_control(i):
            piece = sp.id_to_piece(i)
            lengths[i] = len(piece.replace("\u2581", " ").encode())
            spaced[i] = dummy_prefix and piece.startswith("\u2581")
    return lengths, spaced


def _text_bytes(seq: TokenSequence, table: tuple[np.ndarray, np.ndarray], separator: int, at_start: bool) -> int:
    """UTF-8 bytes of the text a split's ids decode to, document by document (at_start: the split begins
    a document); one pass over its shards."""
    lengths, spaced = table
    total, starts_document = 0, at_start
    for block in seq.blocks():
        ids = block.astype(np.int64)
        starts = np.empty(len(ids), dtype=bool)
        starts[0], starts[1:] = starts_document, ids[:-1] == separator
        total += int(lengths[ids].sum()) - int(np.count_nonzero(starts & spaced[ids]))
        starts_document = bool(ids[-1] == separator)
    return total


def separator_of(tokenizer: Tokenizer) -> int:
    """The id that joins documents: EOS, or BOS for a tokenizer without one (-1: neither)."""
    return tokenizer.eos_id if tokenizer.eos_id >= 0 else tokenizer.bos_id


def text_bytes(seq: TokenSequence, tokenizer: Tokenizer, at_start: bool) -> int:
    """UTF-8 bytes of the text that seq's ids stand for inside a corpus (at_start: seq begins a document), for
    bits per byte, without decoding it: one pass in blocks, in constant memory. Decoding would also drop the
    leading space of a first token that continues a document."""
    return _text_bytes(seq, decoded_bytes_table(tokenizer), separator_of(tokenizer), at_start)


def _batches(pieces: Iterator, chars: int) -> Iterator[list]:
    batch, size = [], 0
    for item in pieces:
        batch.append(item)
        size += len(item[1].text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends ids to part files of at most `limit` tokens each (part-00000.bin, ...), in order."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.parts: list[list] = []  # [path, tokens]
        self.file = None
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        at = 0
        while at < len(ids):
            if self.file is None or self.parts[-1][1] == self.limit:
                self._next_part()
            take = min(len(ids) - at, self.limit - self.parts[-1][1])
            self.file.write(ids[at : at + take].tobytes())
            self.parts[-1][1] += take
            self.tokens += take
            at += take

    def _next_part(self) -> None:
        self._close_file()
        path = self.folder / f"part-{len(self.parts):05d}.bin"
        self.file = open(path, "wb")
        self.parts.append([path, 0])

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None

    def close(self) -> list[tuple[Path, int]]:
        self._close_file()
        return [(path, n) for path, n in self.parts]


# ------------------------------------------------------------------------------------------- split


def _check_split_request(val_fraction: float | None, val_tokens: int | None) -> None:
    if val_fraction is not None and val_tokens is not None:
        raise CorpusError("give a validation fraction or a validation token count, not both")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise CorpusError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if val_tokens is not None and val_tokens < 2:
        raise CorpusError(f"validation tokens must be at least 2, got {val_tokens}")


def _val_cut(stream: TokenSequence, separator: int, target: int) -> tuple[int, str]:
    """(first validation token, rule): the start of the last whole documents holding at least target
    tokens if they hold at most twice that ("documents"), else the last target tokens ("tail")."""
    total = len(stream)
    lowest = max(2, total - 2 * target)  # the earliest cut allowed, so validation stays under 2 x target
    end = total - target
    while end >= lowest:  # look for a separator at p in [lowest - 1, total - target - 1]: the cut is p + 1
        begin = max(lowest - 1, end - SCAN_BLOCK)
        hits = np.flatnonzero(stream[begin:end] == separator)
        if hits.size:
            return begin + int(hits[-1]) + 1, "documents"
        end = begin
    return total - target, "tail"


def _split_parts(folder: Path, parts: list[tuple[Path, int]], cut: int, itemsize: int) -> dict[str, dict]:
    """Part files renamed into train and val shards at the cut (the part it falls in is split in two)."""
    train, val, at = [], [], 0
    for path, n in parts:
        if at + n <= cut:
            train.append(path)
        elif at >= cut:
            val.append(path)
        else:
            keep = cut - at
            tail = path.with_name(path.stem + "-tail.bin")
            with open(path, "rb") as src, open(tail, "wb") as dst:
                src.seek(keep * itemsize)
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.truncate(path, keep * itemsize)
            train.append(path)
            val.append(tail)
        at += n
    splits = {}
    for split, paths in (("train", train), ("val", val)):
        shards = []
        for i, path in enumerate(paths):
            final = path.rename(folder / shard_name(split, i))
            size = final.stat().st_size
            shards.append({"file": final.name, "tokens": size // itemsize, "bytes": size, "sha256": sha256_file(final)})
        if split == "train" or shards:
            splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    return splits


def _choose_split(stream: TokenSequence, separator: int, val_fraction: float | None,
                  val_tokens: int | None) -> dict:
    total = len(stream)
    if val_fraction is None and val_tokens is None:
        return {"rule": "none", "val_fraction": None, "val_tokens": None, "cut": total, "val_documents": 0}
    target = val_tokens if val_tokens is not None else round(val_fraction * total)
    if target < 2 or total - target < 2:
        raise CorpusError(f"a validation split of {target} of the corpus's {total} tokens leaves fewer than 2 tokens "
                          "on one side; ask for a different fraction or token count")
    cut, rule = _val_cut(stream, separator, target)
    separators = sum(int(np.count_nonzero(block == separator)) for block in stream.view(cut).blocks())
    return {"rule": rule, "val_fraction": val_fraction, "val_tokens": val_tokens, "cut": cut,
            "val_documents": separators + (rule == "documents")}


# ------------------------------------------------------------------------------------------ output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale_temporaries(output: Path) -> None:
    """Folders left beside output by a prepare that was killed (its process is gone)."""
    if not output.parent.is_dir():
        return
    for path in output.parent.glob(f".{output.name}.prepare-*"):
        pid = path.name[len(f".{output.name}.prepare-"):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _check_output(output: Path, overwrite: bool) -> None:
    """An output may be new, an empty folder, or (with overwrite) a prepared corpus; nothing else is replaced.
    Its folder must be one (not a file), checked before any work."""
    check_output_location(output)
    if not output.exists() and not output.is_symlink():
        return
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return
    if not is_prepared(output):
        raise CorpusError(f"output {output} exists and is not a prepared corpus; choose another output")
    if not overwrite:
        raise CorpusError(f"output {output} is already a prepared corpus; pass --overwrite to replace it")


def _install(folder: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder to output; a replaced corpus is moved aside first, then removed."""
    _check_output(output, overwrite)
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.prepare-{os.getpid()}-old")
        os.rename(output, old)
    os.rename(folder, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(output.parent)


def _write_manifest(folder: Path, data: dict) -> None:
    with open(folder / MANIFEST, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------- prepare


def _encode_inputs(files: list[Path], records: list[dict], writer: _ShardWriter, encoder: _Encoder,
                   text_field: str, piece_bytes: int | None, progress: Callable | None) -> int:
    """Read, encode and write every input in order; returns the number of documents."""
    total_bytes, start = sum(r["bytes"] for r in records), time.perf_counter()
    documents, position = 0, [0]

    def pieces():
        nonlocal documents
        done = 0
        for path, record in zip(files, records):
            for piece in read_pieces(path, text_field, piece_bytes):
                position[0] = done + piece.offset
                if piece.first and piece.last and not piece.text:  # empty: no document, so no separator
                    continue
                yield documents, piece
                if piece.last:
                    documents += 1
                    record["documents"] += 1
            done += record["bytes"]

    def write(future, bytes_read, docs):
        writer.write(future.result())
        if progress is not None:
            progress(PrepareProgress(bytes_read, total_bytes, docs, writer.tokens, time.perf_counter() - start))

    if progress is not None:
        progress(PrepareProgress(0, total_bytes, 0, 0, 0.0))
    with ThreadPoolExecutor(max_workers=1) as pool:  # encode one batch while the next is read
        pending = None
        for batch in _batches(pieces(), max(BATCH_CHARS, 2 * encoder.workers * PIECE_BYTES)):
            submitted = (pool.submit(encoder, batch), position[0], documents)
            if pending is not None:
                write(*pending)
            pending = submitted
        if pending is not None:
            write(*pending)
    return documents


def _write_corpus(folder: Path, files: list[Path], records: list[dict], tokenizer: Tokenizer, separator: int,
                  options: dict, progress: Callable | None) -> dict:
    """Encode the inputs into shards in folder and split them; returns the manifest to write beside them."""
    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(folder, options["shard_tokens"])
    encoder = _Encoder(tokenizer, options["workers"] or os.cpu_count() or 1, dtype, separator)
    piece_bytes = PIECE_BYTES if chunks_exactly(tokenizer) else None
    try:
        documents = _encode_inputs(files, records, writer, encoder, options["text_field"], piece_bytes, progress)
    finally:
        parts = writer.close()
    if writer.tokens == 0:
        raise CorpusError(f"the inputs ({', '.join(r['path'] for r in records[:3])}) hold no text")
    stream = TokenSequence.from_files(parts, dtype)
    split = _choose_split(stream, separator, options["val_fraction"], options["val_tokens"])
    table = decoded_bytes_table(tokenizer)
    text_bytes = {"train": _text_bytes(stream.view(0, split["cut"]), table, separator, True),
                  "val": _text_bytes(stream.view(split["cut"]), table, separator, split["rule"] == "documents")}
    del stream  # closes the part files before they are split and renamed
    splits = _split_parts(folder, parts, split["cut"], dtype.itemsize)
    for name, entry in splits.items():
        entry["text_bytes"] = text_bytes[name]
    return {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"name": tokenizer.name, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "dtype": dtype.name, "separator_id": separator, "documents": documents, "tokens": writer.tokens,
        "splits": splits, "split": split, "text_field": options["text_field"],
        "shard_tokens": options["shard_tokens"], "inputs": records,
    }


def prepare(inputs, output: str | os.PathLike, tokenizer: Tokenizer, *, val_fraction: float | None = None,
            val_tokens: int | None = None, text_field: str = "text", shard_tokens: int = SHARD_TOKENS,
            workers: int | None = None, progress: Callable[[PrepareProgress], None] | None = None,
            overwrite: bool = False) -> Manifest:
    """Tokenize INPUTS (files, directories, globs) into a prepared corpus at output; returns its manifest.

    val_fraction / val_tokens hold out a validation split (see the module's docstring); shard_tokens caps
    each shard file; workers is sentencepiece's thread count (default: every core); progress is called
    at the start and after each batch. Written in a temporary folder beside output and renamed at the
    end, so output is either absent or complete; an existing output is refused unless it is a prepared
    corpus and overwrite is set."""
    output = Path(output)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    _check_split_request(val_fraction, val_tokens)
    if shard_tokens < 1:
        raise CorpusError(f"shard size must be at least 1 token, got {shard_tokens}")
    files, skipped = expand_inputs(inputs)
    _check_output(output, overwrite)
    separator = separator_of(tokenizer)
    if separator < 0:
        raise CorpusError(f"tokenizer {tokenizer.name} has neither an EOS nor a BOS id to separate documents")
    records = [{"path": str(p.resolve()), "format": file_format(p), "bytes": p.stat().st_size,
                "sha256": sha256_file(p), "documents": 0} for p in files]
    options = dict(val_fraction=val_fraction, val_tokens=val_tokens, text_field=text_field,
                   shard_tokens=shard_tokens, workers=workers)
    _remove_stale_temporaries(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{output.name}.prepare-{os.getpid()}-", dir=output.parent))
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        folder.chmod(0o777 & ~umask)  # mkdtemp makes it private; the corpus gets the usual permissions
        manifest = _write_corpus(folder, files, records, tokenizer, separator, options, progress)
        _write_manifest(folder, {**manifest, "skipped": [str(p) for p in skipped]})
        _install(folder, output, overwrite)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return read_manifest(output)
