"""What every command shares: the Click group, one-line errors, devices, config files, checkpoints."""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path

import click

from minifn.config import ModelConfig

DEFAULT_DATASET = "data/lighthouse.txt"
DEFAULT_CHECKPOINT = "checkpoints/mini.pt"


class UserError(click.ClickException):
    """A mistake the user can fix: printed as one 'Error: ...' line, exit status 1."""


def one_line_errors(fn):
    """Turn the library's validation errors into one-line messages (--verbose adds the traceback)."""
    from minifn.checkpoint import CheckpointError
    from minifn.config import ConfigError
    from minifn.tokenizer import TokenizerError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, TokenizerError, CheckpointError, ValueError, OSError, RuntimeError, MemoryError) as e:
            if kwargs.get("verbose"):
                traceback.print_exc()
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(message) from None

    return wrapper


def load_config_file(ctx, param, value):
    """--config FILE: a TOML table of option defaults (command-line flags still win)."""
    if value is None:
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(value, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise click.BadParameter(f"cannot read {value}: {e}") from None
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(k.replace("-", "_") for k in table) - known)
    if unknown:
        raise click.BadParameter(f"{value} has unknown keys: {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v for k, v in table.items()}}
    return value


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "float32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; use --dtype float32")
    return torch.bfloat16


def bundled(path: str) -> str:
    """A default data path relative to the working directory, else to the source checkout."""
    if Path(path).exists():
        return path
    candidate = Path(__file__).resolve().parents[2] / path  # the repository root
    return str(candidate) if candidate.exists() else path


class OneLineErrors(click.Group):
    """Usage mistakes print as one 'Error: ...' line (exit 2), without Click's usage block."""

    def main(self, *args, standalone_mode=True, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=OneLineErrors,
             context_settings={"auto_envvar_prefix": "MINIFN", "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="minifn")
def cli():
    """minifn: pure-functional language-model training on torch.func and torch.compile."""



def load_model(path: str, device):
    """(params, model config, tokenizer, meta) from a training checkpoint; the tokenizer must be the one
    the model was trained with (checked by sha256)."""
    from minifn.checkpoint import CheckpointError, load
    from minifn.model import skeleton
    from minifn.tokenizer import load_tokenizer

    tensors, meta = load(path)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
        tok_name, tok_sha = meta["tokenizer"]["name"], meta["tokenizer"]["sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no usable model config ({e})") from None
    params = {k.removeprefix("params."): v.to(device) for k, v in tensors.items() if k.startswith("params.")}
    expected = {name: tuple(p.shape) for name, p in skeleton(config).named_parameters()}
    if {k: tuple(v.shape) for k, v in params.items()} != expected:
        raise CheckpointError(f"checkpoint {path} holds parameters that do not fit its own model config")
    tok = load_tokenizer(tok_name)
    if tok.sha256 != tok_sha:
        raise CheckpointError(f"tokenizer {tok_name} is not the one {path} was trained with (sha256 differs)")
    return params, config, tok, meta

