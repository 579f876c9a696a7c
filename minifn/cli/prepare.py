"""`minifn prepare`: text files, directories or globs in, a prepared corpus (token shards + manifest) out."""

from __future__ import annotations

import sys
import time

import click

from minifn.cli.base import UserError, cli, one_line_errors
from minifn.cli.types import FiniteFloat


class _ProgressBar:
    """A tqdm bar over input bytes (its rate in MB/s) with the tokens written, made at the first report."""

    def __init__(self):
        self.bar = None

    def __call__(self, p) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare",
                            dynamic_ncols=True, leave=False)
        self.bar.set_postfix_str(f"{p.tokens / 1e6:.1f}M tokens written", refresh=False)
        self.bar.update(p.bytes_read - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@cli.command(short_help="Tokenize text, JSONL and Parquet inputs into a prepared corpus (token shards).")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--output", "-o", required=True, help="The corpus directory to create.")
@click.option("--tokenizer", default="mistral", show_default=True,
              help="SentencePiece model file, or 'mistral' for the bundled default.")
@click.option("--val-fraction", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None,
              help="Hold out this fraction of the tokens for validation: the last whole documents, or the "
                   "last tokens of few long ones.")
@click.option("--val-tokens", type=click.IntRange(min=2), default=None,
              help="Hold out this many tokens for validation (chosen as for --val-fraction).")
@click.option("--text-field", default="text", show_default=True, help="The text field of JSONL and Parquet inputs.")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=100_000_000, show_default=True,
              help="The most tokens in one shard file.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Encoding threads [every core].")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it is a prepared corpus.")
@click.option("--verbose", is_flag=True, help="Tracebacks with errors.")
@one_line_errors
def prepare(inputs, output, tokenizer, val_fraction, val_tokens, text_field, shard_tokens, workers, overwrite,
            verbose):
    """Tokenize INPUT... (text, .jsonl, .jsonl.gz and .parquet files; directories; globs) into OUTPUT:
    uint16/uint32 token shards and a manifest.json that `minifn train --dataset OUTPUT` reads."""
    from minifn.prepare import prepare as prepare_corpus
    from minifn.tokenizer import load_tokenizer

    start = time.perf_counter()
    if val_fraction is not None and val_tokens is not None:
        raise UserError("give --val-fraction or --val-tokens, not both")
    tok = load_tokenizer(tokenizer)
    bar = _ProgressBar() if sys.stderr.isatty() else None  # only on a terminal
    try:
        manifest = prepare_corpus(inputs, output, tok, val_fraction=val_fraction, val_tokens=val_tokens,
                                  text_field=text_field, shard_tokens=shard_tokens, workers=workers,
                                  progress=bar, overwrite=overwrite)
    finally:
        if bar is not None:
            bar.close()
    click.echo(summary(manifest, time.perf_counter() - start))


def summary(manifest, seconds: float) -> str:
    """The closing lines: documents, files, bytes, speed, tokens per split, where."""
    train = manifest.split_tokens("train")
    val = manifest.split_tokens("val") if "val" in manifest.data["splits"] else 0
    split = manifest.split
    held = (f", {val} validation ({split['val_documents']} whole documents)" if split["rule"] == "documents"
            else f", {val} validation (the last tokens)" if val else "")
    skipped = manifest.data.get("skipped", [])
    note = (f"Note: skipped {len(skipped)} file(s) in input directories whose suffix is not a data format "
            f"(e.g. {skipped[0]})\n" if skipped else "")
    megabytes = manifest.input_bytes / 1e6
    return (f"{note}Prepared {manifest.documents} documents from {len(manifest.data['inputs'])} file(s) "
            f"({megabytes:.1f} MB in {seconds:.1f} s, {megabytes / max(seconds, 1e-9):.1f} MB/s): {manifest.tokens} "
            f"tokens, {train} train{held}, {manifest.dtype.name}, in {manifest.path}")
