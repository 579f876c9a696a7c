"""SentencePiece models in the Hugging Face tokenizer format, without protobuf or transformers.

The .model file is read directly (a protobuf of pieces, scores, types and normaliser settings) and
turned into a `tokenizer.json` whose BPE pipeline encodes text to the same ids as SentencePiece.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path


class HFError(ValueError):
    """A model or directory that cannot be converted exactly; the message names the field."""


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece_model.proto piece types
SPIECE = "\u2581"  # SentencePiece's escaped space


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: varints as int, everything else as bytes."""
    fields, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = buf[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise HFError(f"unexpected protobuf wire type {wire}")
        fields.append((key >> 3, value))
    return fields


def read_sentencepiece(path: str | os.PathLike) -> dict:
    """The parts of a SentencePiece ModelProto the conversion needs, read without protobuf:
    pieces [(piece, score, type)], model_type (1 unigram, 2 BPE) and the normalizer's settings."""
    try:
        top = _proto_fields(Path(path).read_bytes())
        pieces = []
        for number, value in top:
            if number == 1:
                piece = dict(_proto_fields(value))
                score = struct.unpack("<f", piece.get(2, b"\0\0\0\0"))[0]
                pieces.append((piece[1].decode(), score, piece.get(3, NORMAL)))
        trainer = dict(f for n, v in top if n == 2 for f in _proto_fields(v))
        normalizer = dict(f for n, v in top if n == 3 for f in _proto_fields(v))
    except (IndexError, KeyError, UnicodeDecodeError, struct.error):
        raise HFError(f"{path} is not a SentencePiece model") from None
    return {"pieces": pieces, "model_type": trainer.get(3, 1), "treat_whitespace_as_suffix": trainer.get(24, 0),
            "normalizer": normalizer.get(1, b"nmt_nfkc").decode(), "charsmap": normalizer.get(2, b""),
            "add_dummy_prefix": normalizer.get(3, 1), "remove_extra_whitespaces": normalizer.get(4, 1),
            "escape_whitespaces": normalizer.get(5, 1)}


def check_convertible(spm: dict, path) -> None:
    """Refuse SentencePiece settings that the BPE tokenizer.json written here would not reproduce."""
    settings = {"model_type": (spm["model_type"], 2, "only BPE models convert to a Llama tokenizer"),
                "normalization": (spm["normalizer"] if spm["charsmap"] else "identity", "identity",
                                  "transformers' Llama tokenizer has no Unicode normalizer"),
                "remove_extra_whitespaces": (spm["remove_extra_whitespaces"], 0, "Llama tokenizers keep every space"),
                "escape_whitespaces": (spm["escape_whitespaces"], 1, "Llama tokenizers escape spaces"),
                "treat_whitespace_as_suffix": (spm["treat_whitespace_as_suffix"], 0, "Llama puts spaces first"),
                "user_defined pieces": (any(t == USER_DEFINED for _, _, t in spm["pieces"]), False, "not converted")}
    for field, (value, wanted, why) in settings.items():
        if value != wanted:
            raise HFError(f"tokenizer {path}: {field} {value!r} cannot be exported ({why})")


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[str]:
    """Merges 'left right' for every normal piece that two normal pieces concatenate to, highest score first:
    the order in which SentencePiece's BPE would apply them (as transformers' own converter orders them)."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    merges = []
    for piece, score, kind in pieces:
        if kind != NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += [(-score, -len(a), -len(b), a, b) for a, b in sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))]
    merges.sort(key=lambda m: m[:3])  # stable: ties keep vocabulary order
    return [f"{a} {b}" for *_, a, b in merges]


def tokenizer_json(spm: dict) -> dict:
    """tokenizer.json equal to SentencePiece's encoding: prepend the dummy '▁' to the whole text and replace every
    space (the 'legacy' Llama normalizer, which keeps '▁▁' for a leading space), BPE with byte fallback, no BOS."""
    pieces, unk = spm["pieces"], next((p for p, _, t in spm["pieces"] if t == UNKNOWN), None)
    special = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, (p, _, t) in enumerate(pieces) if t in (UNKNOWN, CONTROL)]
    prepend = [{"type": "Prepend", "prepend": SPIECE}] if spm["add_dummy_prefix"] else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if spm["add_dummy_prefix"] else []
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            *prepend, {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPIECE}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, *strip]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": any(t == BYTE for _, _, t in pieces),
                  "ignore_merges": False, "vocab": {p: i for i, (p, _, _) in enumerate(pieces)},
                  "merges": bpe_merges(pieces)},
    }


def tokenizer_files(spm: dict, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                    max_seq_len: int) -> dict[str, dict]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json. The class is PreTrainedTokenizerFast,
    which runs tokenizer.json as written: transformers 5's LlamaTokenizer rebuilds its own pipeline, whose
    Metaspace pre-tokenizer drops SentencePiece's dummy prefix before a leading space (other ids there)."""
    piece = {i: p for i, (p, _, _) in enumerate(spm["pieces"])}
    unk_id = next((i for i, (_, _, kind) in enumerate(spm["pieces"]) if kind == UNKNOWN), None)
    ids = {"bos_token": bos_id, "eos_token": eos_id, "pad_token": pad_id, "unk_token": unk_id}
    specials = {name: piece[i] for name, i in ids.items() if i in piece}  # None (no such piece) is left out
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": False,
              "add_eos_token": False, "split_special_tokens": True,  # '<s>' in text is text, as in SentencePiece
              "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len}
    return {"tokenizer.json": tokenizer_json(spm), "tokenizer_config.json": config,
            "special_tokens_map.json": specials}
