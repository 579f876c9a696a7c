"""Text sources for `prepare` and tokenizer training: inputs expanded to files, files read as documents.

Formats, by file name:
    .jsonl, .jsonl.gz   one JSON object per line; its text field (default "text") is one document
    .parquet            one document per row of a text column (needs pyarrow: pip install minifn[parquet])
    anything else       UTF-8 text, the whole file one document

Inputs may be files, directories (searched recursively for the suffixes in DATA_SUFFIXES, hidden files
and folders skipped) and glob patterns (`**` recurses); the files come out sorted, duplicates once.
Documents are read as pieces that begin at a line start (a few hundred KB each), so no reader ever holds
a whole file: memory is bounded by the piece size and the longest line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minifn.corpus import CorpusError

DATA_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".jsonl.gz", ".parquet")
PIECE_BYTES = 1 << 18
PARQUET_ROWS = 1024


class MissingTextField(CorpusError):
    """A JSONL line or Parquet file without the text field asked for; .problem is the message without its
    advice to choose another with --text-field (a flag of prepare and tokenizer train only)."""

    def __init__(self, problem: str, advice: str):
        super().__init__(problem + advice)
        self.problem = problem


@dataclass(frozen=True)
class Piece:
    """Part of a document's text that starts at a line start (or at the document's start)."""

    text: str
    first: bool  # begins a document
    last: bool  # ends it
    offset: int  # bytes of its file read so far (for progress)


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _in_directory(root: Path) -> tuple[list[Path], list[Path]]:
    """(data files, other files) under root, recursively, hidden ones left out."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))
    return ([p for p in files if p.name.lower().endswith(DATA_SUFFIXES)],
            [p for p in files if not p.name.lower().endswith(DATA_SUFFIXES)])


def expand_inputs(inputs) -> tuple[list[Path], list[Path]]:
    """(files to read, files skipped in directories for their suffix) for INPUT arguments, in order."""
    files, skipped = [], []
    for given in map(str, inputs):
        path = Path(given)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found, other = _in_directory(path)
            skipped += other
            if not found:
                raise CorpusError(f"input directory {given} has no {', '.join(DATA_SUFFIXES)} files")
        elif glob.has_magic(given):
            found = []
            for match in sorted(map(Path, glob.glob(given, recursive=True))):  # as a directory's files sort
                found += [match] if match.is_file() else _in_directory(match)[0] if match.is_dir() else []
            if not found:
                raise CorpusError(f"input pattern {given} matches no files")
        else:
            raise CorpusError(f"input {given} does not exist")
        files += found
    unique, seen = [], set()
    for path in files:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique, skipped


# ---------------------------------------------------------------------------------------- readers


def split_at_lines(text: str, size: int | None) -> list[str]:
    """text in pieces of about size characters, each cut just after a newline (a line longer than size
    stays whole); None: one piece."""
    if size is None or len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        if cut <= start:
            cut = text.find("\n", start + size) + 1
            if cut == 0:
                break
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def _document(text: str, size: int | None, offset: int) -> Iterator[Piece]:
    pieces = split_at_lines(text, size)
    for i, piece in enumerate(pieces):
        yield Piece(piece, i == 0, i == len(pieces) - 1, offset)


def _decode(path: Path, data: bytes | bytearray, offset: int) -> str:
    if b"\x00" in data:
        raise CorpusError(f"input {path} looks binary (it contains NUL bytes); give UTF-8 text, JSONL or Parquet")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"input {path} is not UTF-8 text (bad byte at offset {offset + e.start}); "
                          "convert it with iconv") from None


def _text_pieces(path: Path, size: int | None) -> Iterator[Piece]:
    """A text file as one document, read a block at a time and cut after the last newline of each."""
    with open(path, "rb") as f:
        if size is None:
            yield Piece(_decode(path, f.read(), 0), True, True, f.tell())
            return
        buffer, first, done = bytearray(), True, 0
        while block := f.read(size):
            buffer += block
            cut = buffer.rfind(b"\n") + 1
            if cut:
                yield Piece(_decode(path, buffer[:cut], done), first, False, f.tell())
                del buffer[:cut]
                first, done = False, done + cut
        yield Piece(_decode(path, buffer, done), first, True, f.tell())


def _jsonl_pieces(path: Path, field: str, size: int | None) -> Iterator[Piece]:
    """One document per non-blank line: the line's JSON object's text field."""
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise CorpusError(f"{path}:{number} is not valid JSON ({str(e).splitlines()[0][:60]})") from None
                text = record.get(field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise MissingTextField(f"{path}:{number} has no text field '{field}'",
                                           " (choose it with --text-field)")
                yield from _document(text, size, raw.tell())
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise CorpusError(f"{path} is not a complete gzip file ({e})") from None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow: pip install minifn[parquet]") from None
    return pq


def _parquet_pieces(path: Path, field: str, size: int | None) -> Iterator[Piece]:
    """One document per row of the text column, read a batch of rows at a time."""
    pq = _pyarrow_parquet()
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
        raise CorpusError(f"input {path} is not a Parquet file ({str(e).splitlines()[0][:80]})") from None
    names = table.schema_arrow.names
    if field not in names:
        raise MissingTextField(f"{path} has no column '{field}' (it has {', '.join(names)})",
                               " (choose it with --text-field)")
    rows, file_bytes = max(table.metadata.num_rows, 1), path.stat().st_size
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_ROWS, columns=[field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise CorpusError(f"{path} row {row}: column '{field}' holds {type(text).__name__}, not text")
            row += 1
            yield from _document(text, size, file_bytes * row // rows)


def read_pieces(path: Path, text_field: str = "text", piece_bytes: int | None = PIECE_BYTES) -> Iterator[Piece]:
    """The documents of one input file as pieces cut at line starts (piece_bytes=None: whole documents)."""
    kind = file_format(path)
    if kind == "jsonl":
        return _jsonl_pieces(path, text_field, piece_bytes)
    if kind == "parquet":
        return _parquet_pieces(path, text_field, piece_bytes)
    return _text_pieces(path, piece_bytes)


def input_bytes(files: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in files)
