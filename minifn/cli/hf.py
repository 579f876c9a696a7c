"""`minifn export` and `minifn import`: the Hugging Face Llama format (the conversion lives in minifn.hf)."""

from __future__ import annotations

import click

from minifn.cli.base import DEFAULT_CHECKPOINT, cli, one_line_errors


@cli.command("export")
@click.option("--model", "checkpoint_path", default=DEFAULT_CHECKPOINT, show_default=True, help="Checkpoint.")
@click.option("--output", required=True, help="Folder to create (absent or empty).")
@click.option("--weights", type=click.Choice(["raw", "ema"]), default="raw", show_default=True,
              help="The trained parameters, or their moving average (a run trained with --ema).")
@click.option("--tokenizer", default=None, help="The SentencePiece model the checkpoint was trained with, where it "
              "moved [the one it records].")
@click.option("--verbose", is_flag=True)
@one_line_errors
def export(checkpoint_path, output, weights, tokenizer, verbose):
    """Write a checkpoint as a Llama-format folder that transformers loads (model, config, tokenizer)."""
    from minifn.hf import export_checkpoint

    directory = export_checkpoint(checkpoint_path, output, weights, tokenizer)
    click.echo(f"Exported {weights} weights of {checkpoint_path} to {directory}")
    click.echo(f"Load with: AutoModelForCausalLM.from_pretrained({str(directory)!r})")


@cli.command("import")
@click.option("--input", "directory", required=True, help="Llama/Mistral-format folder (config.json, "
              "*.safetensors, tokenizer.model).")
@click.option("--output", required=True, help="Checkpoint file to write (must not exist).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Context length [the model's max_position_embeddings]; sizes generate's KV cache.")
@click.option("--verbose", is_flag=True)
@one_line_errors
def import_(directory, output, max_seq_len, verbose):
    """Convert a Llama/Mistral-format folder into a minifn checkpoint for generate, eval and --init-from."""
    from minifn.hf import import_directory
    from minifn.model import num_params

    path, config = import_directory(directory, output, max_seq_len)
    click.echo(f"Imported {directory}: {num_params(config):,} parameters, {config.num_layers} layers, "
               f"context {config.max_seq_len}")
    click.echo(f"Checkpoint saved: {path}")
