"""The `minifn` command line: a Click group over the pure core. I/O, devices and errors live here.

Every option can also come from a TOML file (`--config FILE`, keys as option names with underscores)
or from the environment as MINIFN_<COMMAND>_<OPTION>, e.g. MINIFN_TRAIN_LR=3e-4.

    base.py      the group, one-line errors, devices, config files, loading a trained model
    tokenize.py  minifn tokenize, minifn tokenizer train
    prepare.py   minifn prepare (text, JSONL, Parquet to token shards)
    train.py     minifn train
    generate.py  minifn generate
    evaluate.py  minifn eval, minifn plot
    hf.py        minifn export, minifn import (the Hugging Face Llama format)
    sweep.py     minifn sweep (several runs in one vmapped step)
"""

from minifn.cli import evaluate, generate, hf, prepare, sweep, tokenize, train  # noqa: F401 - importing registers the commands
from minifn.cli.base import cli
from minifn.cli.signals import exit_cleanly_on_sigterm

__all__ = ["cli", "main"]


def main():
    exit_cleanly_on_sigterm()
    cli()
