"""SentencePiece tokenizers: Mistral's default model from site-packages, text files to cached ids.

Padding policy, in one place: SentencePiece models often have no pad piece (Mistral's has none), so
inputs past the end of the data are filled with `Tokenizer.pad_id` (the pad piece if there is one,
else EOS) and their targets with the loss's ignore index, so padding never reaches the loss.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

MISTRAL = "mistral"


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
    ids: np.ndarray  # int32, one dimension
    seconds: float
    cached: bool


def encode_file(tokenizer: Tokenizer, path: str | os.PathLike, use_cache: bool = True) -> Encoded:
    """Token ids of a text file, cached as .npy under a key of the file's and the model's sha256."""
    start = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        read_text(path)  # raises the precise error
    key = f"{sha256_file(path)[:20]}-{tokenizer.sha256[:20]}.npy"
    cached = cache_dir() / key
    if use_cache and cached.is_file():
        try:
            return Encoded(np.load(cached), time.perf_counter() - start, True)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    ids = np.asarray(tokenizer.encode(read_text(path)), dtype=np.int32)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, ids)
        os.replace(tmp, cached)
    return Encoded(ids, time.perf_counter() - start, False)


def train_tokenizer(inputs: list[str], vocab_size: int, output: str | os.PathLike, model_type: str = "bpe") -> Path:
    """Train a SentencePiece model with byte fallback; writes OUTPUT (.model added if missing)."""
    output = Path(output)
    prefix = output.with_suffix("") if output.suffix == ".model" else output
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        read_text(path)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(p) for p in inputs), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=1.0, pad_id=3,
            remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    except RuntimeError as e:
        reason = str(e).splitlines()[-1].split("] ")[-1]  # drop sentencepiece's source location
        raise TokenizerError(f"tokenizer training failed: {reason[:200]}") from None
    prefix.with_suffix(".vocab").unlink(missing_ok=True)
    return prefix.with_suffix(".model")
