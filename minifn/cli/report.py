"""What `minifn train` prints: the start lines, a progress bar on a terminal, and the tutorial's epoch lines."""

from __future__ import annotations

import sys

import click

from minifn.losses import perplexity


class Printer:
    """Turns the run's events into lines. A tqdm bar appears only when stderr is a terminal."""

    def __init__(self, verbose: bool, criterion: str):
        self.verbose, self.criterion, self.bar = verbose, criterion, None

    def echo(self, line: str) -> None:
        (self.bar.write if self.bar is not None else click.echo)(line)

    def __call__(self, event: dict) -> None:
        getattr(self, event["kind"])(event)

    def start(self, e: dict) -> None:
        if e["resumed"]:
            self.echo(f"Resuming from {e['path']}: epoch {e['epoch'] + 1}, batch {e['batch']}, step {e['step']}")
        if e["changes"]:
            self.echo(f"Note: resuming with changed settings, applied from now on ({'; '.join(e['changes'])})")
        tokenized = ("a prepared corpus" if e.get("corpus") else "read from the token cache" if e["cached"]
                     else f"tokenized in {e['seconds']:.2f} s")
        self.echo(f"Training {e['params'] / 1e6:.2f}M parameters on {e['tokens']} tokens of {e['dataset']} "
                  f"({tokenized}; {e['steps_per_epoch']} steps/epoch, {e['total_steps']} steps in all, "
                  f"device {e['device']}, {e['precision']}, compile {e['compile']})")
        if e["world_size"] > 1:
            n, b, a = e["world_size"], e["batch_size"], e["grad_accum_steps"]
            self.echo(f"Data parallel: {n} processes; global batch {b} x {n} x {a} = {b * n * a} windows per step")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=e["total_steps"], initial=e["step"], unit="step", dynamic_ncols=True, leave=False)

    def step(self, e: dict) -> None:
        if self.bar is not None:
            self.bar.n = e["step"]
            lr = f"{e['lr']:.2e}" if e["lr"] is not None else "-"
            self.bar.set_postfix_str(f"loss {e['loss']:.4f} lr {lr} {e['tokens_per_s']:.0f} tok/s")
        if self.verbose:
            self.echo(f"[Epoch: {e['epoch']}] [Batch: {e['batch']}/{e['batches']}] [Step: {e['step']}] "
                      f"[Loss: {e['loss']:.4f}]")

    def epoch(self, e: dict) -> None:
        line = f"[Epoch: {e['epoch']}/{e['epochs']}] [Avg Loss: {e['loss']:.4f}]"
        if self.criterion == "cross_entropy":
            line += f" [Perplexity: {perplexity(e['loss']):.6f}]"
        if "val_loss" in e:
            line += f" [Val Loss: {e['val_loss']:.4f}]"
            if self.criterion == "cross_entropy":
                line += f" [Val Perplexity: {perplexity(e['val_loss']):.6f}]"
        if "ema_val_loss" in e:
            line += f" [EMA Val Loss: {e['ema_val_loss']:.4f}]"
        self.echo(line)

    def eval(self, e: dict) -> None:
        line = f"[Step: {e['step']}] [Val Loss: {e['val_loss']:.4f}]"
        if self.criterion == "cross_entropy":
            line += f" [Val Perplexity: {e['val_perplexity']:.4f}] [Val BPB: {e['val_bpb']:.4f}]"
        if "ema_val_loss" in e:
            line += f" [EMA Val Loss: {e['ema_val_loss']:.4f}]"
        self.echo(line + (" [best]" if "best" in e else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
