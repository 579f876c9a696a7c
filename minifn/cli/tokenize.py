"""`minifn tokenize` and `minifn tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import click

from minifn.cli.base import UserError, cli, one_line_errors

ROUND_TRIP_LIMIT = 20_000_000  # tokens; a longer file's round trip would hold it all in memory twice
WRITE_IDS = 1 << 20  # ids formatted and written at a time


@cli.command()
@click.option("--model", "--processor", "model", default="mistral", show_default=True,
              help="SentencePiece model file, or 'mistral' for the bundled default.")
@click.option("--input", "input_path", required=True, help="Text file to tokenize.")
@click.option("--output", default=None, help="Write the ids here (.npy, or one id per line otherwise).")
@click.option("--show", default=20, show_default=True, type=click.IntRange(min=0), help="How many tokens to show.")
@one_line_errors
def tokenize(model, input_path, output, show):
    """Tokenize a text file and report what the model sees."""
    from minifn.files import check_output_location
    from minifn.tokenizer import encode_file, load_tokenizer

    if output:  # before the work, not after it
        check_output_location(output)
        if Path(output).is_dir():
            raise UserError(f"cannot write {output}: it is a folder; give the ids file's name")
    tok = load_tokenizer(model)
    encoded = encode_file(tok, input_path)
    ids = encoded.ids
    first = ids[:show].tolist()
    click.echo(f"Vocabulary size: {tok.vocab_size}")
    click.echo(f"Tokens: {len(ids)} ({'cached, ' if encoded.cached else ''}{encoded.seconds:.2f} s)")
    click.echo(f"First {len(first)} ids: {first}")
    click.echo(f"First {len(first)} pieces: {[tok.piece(i) for i in first]}")
    if len(ids) <= ROUND_TRIP_LIMIT:
        click.echo(f"Round trip: {'ok' if round_trip(tok, ids, input_path) else 'differs'}")
    else:
        click.echo(f"Round trip: not checked (over {ROUND_TRIP_LIMIT} tokens)")
    if output:
        write_ids(ids, output)
        click.echo(f"Wrote {len(ids)} ids to {output}")


def round_trip(tok, ids, input_path: str) -> bool:
    """Whether the ids decode back to the input: a text file's whole text, or each document of a JSONL or
    Parquet file (its text fields, which the ids join with EOS; empty ones are left out, as prepare does)."""
    from minifn.prepare import separator_of
    from minifn.sources import file_format, read_pieces
    from minifn.tokenizer import read_text

    if file_format(Path(input_path)) == "text":
        return tok.decode(ids[:]) == read_text(input_path)
    documents, parts = [], []
    for piece in read_pieces(Path(input_path), piece_bytes=None):
        parts.append(piece.text)
        if piece.last:
            if any(parts):
                documents.append("".join(parts))
            parts = []
    flat, separator = ids[:].tolist(), separator_of(tok)
    cuts = [i for i, t in enumerate(flat) if t == separator]
    return [tok.decode(flat[a + 1 : b]) for a, b in zip([-1, *cuts], [*cuts, len(flat)])] == documents


def write_ids(ids, output: str) -> None:
    """The ids as .npy (int32), or one per line otherwise, through a temporary file renamed on success:
    a Ctrl-C or a full disk leaves the old file (or none), never half of the ids."""
    import numpy as np

    from minifn.files import atomic_file

    with atomic_file(output, "wb") as f:
        if output.endswith(".npy"):
            np.save(f, np.concatenate(list(ids.blocks())).astype(np.int32))
        else:
            for at in range(0, len(ids), WRITE_IDS):
                f.write("".join(f"{i}\n" for i in ids[at : at + WRITE_IDS].tolist()).encode())


@cli.group()
def tokenizer():
    """Tokenizer tools."""


@tokenizer.command("train")
@click.option("--input", "inputs", multiple=True, required=True,
              help="Text, .jsonl(.gz) or .parquet file, directory or glob to learn from (repeatable).")
@click.option("--vocab-size", type=click.IntRange(min=8), default=None,
              help="Pieces in the model; required except for --model-type char, where it is a cap.")
@click.option("--model-type", type=click.Choice(["bpe", "unigram", "char"]), default="bpe", show_default=True)
@click.option("--output", required=True, help="The .model file to write (exactly this path).")
@click.option("--text-field", default="text", show_default=True, help="The text field of JSONL and Parquet inputs.")
@click.option("--input-sentence-size", type=click.IntRange(min=0), default=2_000_000, show_default=True,
              help="Learn from a random sample of this many lines (0: all), so inputs larger than memory work.")
@one_line_errors
def tokenizer_train(inputs, vocab_size, model_type, output, text_field, input_sentence_size):
    """Train a SentencePiece model (byte fallback, so any text encodes)."""
    from minifn.tokenizer import load_tokenizer, train_tokenizer

    if vocab_size is None and model_type != "char":
        raise UserError(f"--vocab-size is required for a {model_type} model")
    path = train_tokenizer(list(inputs), vocab_size, output, model_type, text_field=text_field,
                           input_sentence_size=input_sentence_size)
    click.echo(f"Wrote {path} ({load_tokenizer(path).vocab_size} pieces)")
