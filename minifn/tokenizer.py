"""SentencePiece tokenizers: Mistral's default model from site-packages, text files to cached ids, training.

Padding policy, in one place: SentencePiece models often have no pad piece (Mistral's has none), so
inputs past the end of the data are filled with `Tokenizer.pad_id` (the pad piece if there is one,
else EOS) and their targets with the loss's ignore index, so padding never reaches the loss.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from minifn.files import check_output_location, write_atomically

if TYPE_CHECKING:
    from minifn.corpus import Corpus, TokenSequence

MISTRAL = "mistral"
MODEL_TYPES = ("bpe", "unigram", "char")
TRAIN_SENTENCES = 2_000_000  # lines sampled for tokenizer training (sentencepiece's input_sentence_size)
MAX_SENTENCE_CHARS = 1000  # longer lines reach the trainer in parts (it skips lines over 4192 bytes)


class TokenizerError(ValueError):
    """A tokenizer or text file that cannot be used; the message says which and why."""


def mistral_model_path() -> Path:
    """Mistral's 32000-piece model as shipped by mistral-common, found without importing the package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the default tokenizer needs the mistral-common package: pip install mistral-common")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise TokenizerError(f"mistral-common is installed but {path} is missing; reinstall mistral-common")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Tokenizer:
    """A loaded SentencePiece model and its identity (name as given, sha256 of the model file)."""

    sp: spm.SentencePieceProcessor
    name: str
    sha256: str

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.eos_id(), 0)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


def load_tokenizer(name_or_path: str | os.PathLike = MISTRAL) -> Tokenizer:
    """Load 'mistral' (the default) or a SentencePiece .model file."""
    path = mistral_model_path() if str(name_or_path) == MISTRAL else Path(name_or_path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer model {path} does not exist (use 'mistral' or a SentencePiece .model file)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0][:80]})") from None
    return Tokenizer(sp, str(name_or_path), sha256_file(path))


def read_text(path: str | os.PathLike) -> str:
    """A dataset file as text, with a one-line error for anything that is not non-empty UTF-8 text."""
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"dataset {path} does not exist")
    if not path.is_file():
        raise TokenizerError(f"dataset {path} is not a file")
    data = path.read_bytes()
    if not data.strip():
        raise TokenizerError(f"dataset {path} is empty")
    if b"\x00" in data:
        raise TokenizerError(f"dataset {path} looks binary (it contains NUL bytes); give a plain-text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"dataset {path} is not UTF-8 text (bad byte at offset {e.start}); "
                             "convert it with iconv") from None


def cache_dir() -> Path:
    return Path(os.environ.get("MINIFN_CACHE_DIR", Path.home() / ".cache" / "minifn")) / "tokens"


@dataclass(frozen=True)
class Encoded:
    ids: TokenSequence  # the file's ids, read from the cache entry's shards per slice (int64 slices)
    seconds: float
    cached: bool
    corpus: Corpus | None = None  # the cache entry, a prepared corpus (None with use_cache=False)


def _check_dataset(path: Path) -> None:
    """read_text's errors for a missing, non-file or empty dataset, without reading a large file whole."""
    if not path.exists():
        raise TokenizerError(f"dataset {path} does not exist")
    if not path.is_file():
        raise TokenizerError(f"dataset {path} is not a file")
    with open(path, "rb") as f:
        if not f.read(1 << 20).strip() and not f.read(1):
            raise TokenizerError(f"dataset {path} is empty")


def _cached_corpus(entry: Path, tokenizer: Tokenizer, file_sha256: str) -> Corpus | None:
    """The cache entry if it checks out in full (manifest, sizes, shard hashes, ids inside the vocabulary,
    the same file and model), else None after removing whatever is there."""
    from minifn.corpus import CorpusError, open_corpus

    if not entry.exists() and not entry.is_symlink():
        return None
    try:
        corpus = open_corpus(entry, tokenizer.sha256, vocab_size=tokenizer.vocab_size, verify=True)
        if [record["sha256"] for record in corpus.manifest.data["inputs"]] == [file_sha256]:
            return corpus
    except CorpusError:
        pass
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    return None


def _make_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenizerError(f"cannot create the token cache folder {folder} ({e.strerror or e}); "
                             "set MINIFN_CACHE_DIR to a writable folder") from None


def encode_file(tokenizer: Tokenizer, path: str | os.PathLike, use_cache: bool = True) -> Encoded:
    """A text file's token ids, by the same path as `minifn prepare`: the file is prepared (one document,
    no split) into the token cache under a key of its sha256 and the model's. The entry is checked in full
    on every use and rebuilt when anything is off; use_cache=False prepares into a temporary folder and
    returns the ids in memory."""
    from minifn.corpus import CorpusError, TokenSequence, is_prepared, open_corpus

    start = time.perf_counter()
    path = Path(path)
    _check_dataset(path)
    if not use_cache:
        with tempfile.TemporaryDirectory() as folder:
            corpus = open_corpus(_prepare_one(path, Path(folder) / "corpus", tokenizer).path)
            ids = TokenSequence.from_arrays(np.concatenate(list(corpus.train.blocks())))
        return Encoded(ids, time.perf_counter() - start, False)
    file_sha256 = sha256_file(path)
    entry = cache_dir() / f"{file_sha256[:20]}-{tokenizer.sha256[:20]}"
    corpus = _cached_corpus(entry, tokenizer, file_sha256)
    if corpus is not None:
        return Encoded(corpus.train, time.perf_counter() - start, True, corpus)
    _make_cache_folder(entry.parent)
    try:
        _prepare_one(path, entry, tokenizer)
    except OSError as e:
        raise TokenizerError(f"could not write the token cache in {entry.parent} ({e.strerror or e}); nothing was "
                             "left behind; free some space there or set MINIFN_CACHE_DIR to another folder") from None
    except CorpusError:
        if not is_prepared(entry):
            raise
        # another process (a data-parallel rank) prepared the same entry meanwhile: use theirs
    corpus = open_corpus(entry, tokenizer.sha256, vocab_size=tokenizer.vocab_size)
    return Encoded(corpus.train, time.perf_counter() - start, False, corpus)


def _prepare_one(path: Path, output: Path, tokenizer: Tokenizer):
    """prepare([path], output): the commands that read a file directly have no --text-field, so a JSONL or
    Parquet file without the default field says how to read another."""
    from minifn.corpus import CorpusError
    from minifn.prepare import prepare
    from minifn.sources import MissingTextField

    try:
        return prepare([path], output, tokenizer)
    except MissingTextField as e:
        raise CorpusError(f"{e.problem}; a file given here is read by that field only (minifn prepare --text-field "
                          "NAME reads another into a corpus folder, which train and eval take)") from None


# --------------------------------------------------------------------------------------- training


def _sentence_parts(line: str) -> list[str]:
    """A line in parts of at most MAX_SENTENCE_CHARS characters, cut before a space where there is one."""
    parts = []
    while len(line) > MAX_SENTENCE_CHARS:
        cut = line.rfind(" ", 1, MAX_SENTENCE_CHARS)
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        parts.append(line[:cut])
        line = line[cut:]
    return parts + [line]


def training_sentences(files: list[Path], text_field: str = "text"):
    """Every non-empty line of the inputs' documents, streamed (long lines in parts)."""
    from minifn.sources import read_pieces

    for path in files:
        for piece in read_pieces(path, text_field):
            for line in piece.text.split("\n"):
                if line:
                    yield from _sentence_parts(line)


def _training_failure(error: RuntimeError, model_type: str, vocab_size: int | None) -> TokenizerError:
    message = str(error).strip().splitlines()
    reason = message[-1].split("] ")[-1].strip() if message else ""  # drop sentencepiece's source location
    if model_type == "char" and "vocab_size" in (message[0] if message else ""):
        reason = (f"vocab size {vocab_size} is too small for a character model of these inputs (it needs 4 special "
                  "pieces, 256 byte pieces and one per character); leave the vocab size out")
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
    if needed:  # sentencepiece's advice names its own --character_coverage, which minifn does not expose
        reason = (f"vocab size {vocab_size} is too small for these inputs, which need {needed.group(1)} pieces (one "
                  f"per character, 256 byte pieces and the special ones); use --vocab-size {needed.group(1)} or more")
    return TokenizerError(f"tokenizer training failed: {(reason or str(error).strip() or 'no reason given')[:200]}")


def train_tokenizer(inputs, vocab_size: int | None, output: str | os.PathLike, model_type: str = "bpe", *,
                    text_field: str = "text", input_sentence_size: int = TRAIN_SENTENCES) -> Path:
    """Train a SentencePiece model with byte fallback and write it to exactly OUTPUT; returns that path.

    inputs are files, directories and globs, read as `minifn prepare` reads them; their lines stream to
    the trainer, which keeps a random sample of input_sentence_size lines (0: all of them), so inputs
    larger than memory work. A char model takes every character (vocab_size, if given, caps it)."""
    from minifn.sources import expand_inputs, input_bytes

    output = Path(output)
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size is None and model_type != "char":
        raise TokenizerError(f"a {model_type} tokenizer needs a vocabulary size")
    check_output_location(output)  # before the training, not after it
    if output.is_dir():
        raise TokenizerError(f"output {output} is a directory; give the model's file name")
    if 0 < input_sentence_size <= 100:
        raise TokenizerError(f"the input sentence size must be 0 (all lines) or over 100, got {input_sentence_size}")
    files, _ = expand_inputs(inputs)
    options = dict(model_type=model_type, vocab_size=vocab_size or 1 << 20, byte_fallback=True,
                   character_coverage=1.0, pad_id=3, remove_extra_whitespaces=False,
                   normalization_rule_name="identity", input_sentence_size=input_sentence_size,
                   shuffle_input_sentence=True, train_extremely_large_corpus=input_bytes(files) > 1 << 30,
                   hard_vocab_limit=model_type != "char", num_threads=os.cpu_count() or 1, minloglevel=2)
    failures, seen = [], [0]

    def sentences():
        try:
            for sentence in training_sentences(files, text_field):
                seen[0] += 1
                yield sentence
        except Exception as e:  # re-raised below: sentencepiece would report it as its own INTERNAL error
            failures.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, **options)
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        if not seen[0]:
            raise TokenizerError(f"the inputs ({', '.join(map(str, files[:3]))}) hold no text to learn from") from None
        raise _training_failure(e, model_type, vocab_size) from None
    write_atomically(output, model.getvalue())
    return output
