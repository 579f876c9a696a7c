"""`minifn generate`: stream a continuation of a prompt from a checkpoint."""

from __future__ import annotations

import sys

import click

from minifn.cli.base import DEFAULT_CHECKPOINT, UserError, cli, load_model, one_line_errors, weights_option
from minifn.cli.types import FiniteFloat


@cli.command()
@click.option("--model", "checkpoint_path", default=DEFAULT_CHECKPOINT, show_default=True, help="Checkpoint.")
@click.option("--tokenizer", default=None, help="The model's SentencePiece file, if it moved (checked by sha256).")
@click.option("--prompt", required=True, help="Text to continue; '-' reads it from stdin.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.8, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0: no top-k filter.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--repetition-penalty", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--greedy", is_flag=True, help="Always take the most likely token (temperature 0).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compile", "compile_mode", type=click.Choice(["auto", "on", "off"]), default="off",
              show_default=True, help="Compile the decode step (pays off for long generations).")
@weights_option
@click.option("--verbose", is_flag=True)
@one_line_errors
def generate(checkpoint_path, tokenizer, prompt, max_tokens, temperature, top_k, top_p, repetition_penalty, greedy,
             seed, device, compile_mode, weights, verbose):
    """Continue a prompt with a trained model, streaming text as it is produced."""
    import torch

    from minifn.generate import TextStream, check_prompt, make_decode_step
    from minifn.generate import generate as generate_ids
    from minifn.run import resolve_device

    device = resolve_device(device)
    params, config, tok, _ = load_model(checkpoint_path, device, tokenizer, weights)
    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes in argv arrive as lone surrogates
        raise UserError(f"the prompt is not valid UTF-8 (bad byte at character {e.start}); "
                        "pass UTF-8 text or pipe it with --prompt -") from None
    prompt_ids = tok.encode(prompt)
    check_prompt(prompt_ids, config)  # before the prompt is echoed, so an error is a line of its own
    stream = TextStream(tok.decode, prompt_ids)
    click.echo(prompt, nl=False)
    count, last = 0, None
    for last in generate_ids(params, prompt_ids, config, max_new_tokens=max_tokens,
                             decode=make_decode_step(config, compile_mode, device), eos_id=tok.eos_id,
                             generator=torch.Generator(device).manual_seed(seed),
                             temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty):
        count += 1
        if last != tok.eos_id:
            click.echo(stream.push(last), nl=False)
    click.echo()
    if last != tok.eos_id and count < max_tokens:
        click.echo(f"(stopped at the model's context length of {config.max_seq_len} tokens)", err=True)

