"""`minifn tokenize` and `minifn tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import click

from minifn.cli.base import cli, one_line_errors


@cli.command()
@click.option("--model", "--processor", "model", default="mistral", show_default=True,
              help="SentencePiece model file, or 'mistral' for the bundled default.")
@click.option("--input", "input_path", required=True, help="Text file to tokenize.")
@click.option("--output", default=None, help="Write the ids here (.npy, or one id per line otherwise).")
@click.option("--show", default=20, show_default=True, type=click.IntRange(min=0), help="How many tokens to show.")
@one_line_errors
def tokenize(model, input_path, output, show):
    """Tokenize a text file and report what the model sees."""
    import numpy as np

    from minifn.tokenizer import encode_file, load_tokenizer, read_text

    tok = load_tokenizer(model)
    encoded = encode_file(tok, input_path)
    ids = encoded.ids
    click.echo(f"Vocabulary size: {tok.vocab_size}")
    click.echo(f"Tokens: {len(ids)} ({'cached, ' if encoded.cached else ''}{encoded.seconds:.2f} s)")
    click.echo(f"First {min(show, len(ids))} ids: {ids[:show].tolist()}")
    click.echo(f"First {min(show, len(ids))} pieces: {[tok.piece(i) for i in ids[:show]]}")
    click.echo(f"Round trip: {'ok' if tok.decode(ids) == read_text(input_path) else 'differs'}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        if output.endswith(".npy"):
            np.save(output, ids)
        else:
            Path(output).write_text("\n".join(map(str, ids.tolist())) + "\n")
        click.echo(f"Wrote {len(ids)} ids to {output}")


@cli.group()
def tokenizer():
    """Tokenizer tools."""


@tokenizer.command("train")
@click.option("--input", "inputs", multiple=True, required=True, help="Text file(s) to learn from.")
@click.option("--vocab-size", type=click.IntRange(min=8), required=True)
@click.option("--model-type", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True)
@click.option("--output", required=True, help="Where to write the .model file.")
@one_line_errors
def tokenizer_train(inputs, vocab_size, model_type, output):
    """Train a SentencePiece model (byte fallback, so any text encodes)."""
    from minifn.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(list(inputs), vocab_size, output, model_type)
    click.echo(f"Wrote {path} ({load_tokenizer(path).vocab_size} pieces)")

