"""`minifn eval` (loss, perplexity and bits per byte on a text) and `minifn plot` (the loss curve)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from minifn.cli.base import DEFAULT_CHECKPOINT, UserError, cli, load_model, one_line_errors, weights_option


@cli.command("eval")
@click.option("--model", "checkpoint_path", default=DEFAULT_CHECKPOINT, show_default=True, help="Checkpoint.")
@click.option("--tokenizer", default=None, help="The model's SentencePiece file, if it moved (checked by sha256).")
@click.option("--dataset", required=True, help="Text file, or prepared corpus folder (scores its validation split).")
@click.option("--batch-stride", type=click.IntRange(min=1), default=None, help="Window stride [max-seq-len / 2].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@weights_option
@click.option("--verbose", is_flag=True)
@one_line_errors
def evaluate(checkpoint_path, tokenizer, dataset, batch_stride, batch_size, device, weights, verbose):
    """Cross-entropy, perplexity and bits per byte of a checkpoint on a text file, or on the validation
    split of a prepared corpus folder."""
    from minifn.corpus import open_dataset
    from minifn.loop import DataSpec
    from minifn.loop import evaluate as evaluate_tokens
    from minifn.losses import perplexity
    from minifn.run import resolve_device
    from minifn.step import make_eval_step

    device = resolve_device(device)
    params, config, tok, _ = load_model(checkpoint_path, device, tokenizer, weights)
    corpus = open_dataset(dataset, tok)
    split = "val" if corpus.val is not None else "train"
    if split == "train" and corpus.path.resolve() == Path(dataset).resolve():  # a folder without a split
        click.echo(f"Note: {dataset} has no validation split; scoring all of its tokens", err=True)
    tokens = corpus.val if split == "val" else corpus.train
    if len(tokens) < 2:
        raise UserError(f"dataset {dataset} has {len(tokens)} token(s); evaluation needs at least 2")
    stride = batch_stride or max(1, config.max_seq_len // 2)
    if stride > config.max_seq_len:
        raise UserError(f"--batch-stride {stride} is larger than the model's context {config.max_seq_len}")
    spec = DataSpec(config.max_seq_len, stride, batch_size, pad_id=tok.pad_id)
    loss, count = evaluate_tokens(make_eval_step(config, compile="off"), params, tokens, spec, device)
    num_bytes = max(1, corpus.manifest.text_bytes(split))
    click.echo(f"Cross-entropy: {loss:.4f} nats/token")
    click.echo(f"Perplexity: {perplexity(loss):.4f}")
    click.echo(f"Bits per byte: {loss * count / math.log(2) / num_bytes:.4f}")
    click.echo(f"Tokens evaluated: {count}")


@cli.command()
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", default="loss.png", show_default=True,
              help="Picture to write: PNG, or the format its suffix names (.svg, .pdf...); a folder gets loss.png.")
@one_line_errors
def plot(metrics, output):
    """Plot the loss curves of METRICS.jsonl files (or of every run in a sweep's folder) against steps."""
    from minifn.plot import plot_metrics

    files = [p for m in metrics for p in (sorted(Path(m).glob("*.metrics.jsonl")) if Path(m).is_dir() else [Path(m)])]
    if not files:
        raise UserError(f"no .metrics.jsonl files in {', '.join(metrics)}")
    click.echo(f"Wrote {plot_metrics(files, output)}")
