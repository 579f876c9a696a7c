"""What every command shares: the Click group, options derived from settings, config files, errors,
and loading a trained model."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
import traceback
from pathlib import Path

import click

from minifn.cli.types import FiniteFloat, ValueList
from minifn.config import flag

DEFAULT_CHECKPOINT = "checkpoints/mini.pt"
EXIT_BUG = 70  # EX_SOFTWARE: an internal error, not the user's


class UserError(click.ClickException):
    """A mistake the user can fix: printed as one 'Error: ...' line, exit status 1."""


def _is_users(e: BaseException) -> bool:
    """minifn's own error classes describe input the user can fix; so do file and memory errors.
    Anything else (a bare ValueError in torch, a KeyError in minifn) is a bug."""
    import torch

    return (type(e).__module__.startswith("minifn") or isinstance(e, (OSError, MemoryError, torch.OutOfMemoryError)))


def _report_bug(e: BaseException) -> str:
    """Write the traceback to a file and return its path."""
    folder = Path(os.environ.get("MINIFN_CACHE_DIR", Path.home() / ".cache" / "minifn"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    fd, path = tempfile.mkstemp(prefix="minifn-crash-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(e, file=f)
    return path


def one_line_errors(fn):
    """The user's mistakes become one 'Error: ...' line (exit 1; --verbose adds the traceback); anything
    else is reported as a bug in one line, with the traceback written to a file (exit 70)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - sorted into the user's errors and bugs below
            if kwargs.get("verbose"):
                traceback.print_exc()
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            out_of_memory = isinstance(e, MemoryError) or any(
                words in message.lower() for words in ("out of memory", "can't allocate memory"))
            if out_of_memory:  # torch's CPU allocator raises a plain RuntimeError
                raise UserError(f"out of memory ({message[:80]}); try a smaller --batch-size or model") from None
            if _is_users(e):
                raise UserError(message) from None
            click.echo(f"Error: internal error, a bug in minifn or torch, not in your input ({type(e).__name__}: "
                       f"{message[:200]}); traceback written to {_report_bug(e)}", err=True)
            sys.exit(EXIT_BUG)

    return wrapper


def setting_options(fields: list[dataclasses.Field], lists: tuple[str, ...] = ()):
    """Click options for settings fields: the flag, the environment variable and the TOML key all carry
    the field's name; help, default and choices come from the field. Fields named in lists take
    comma-separated values (as text, for the command to split)."""

    def decorate(fn):
        for f in reversed(fields):
            meta, default = f.metadata, f.default
            help = meta["help"] + (f" In {meta['unit']}." if meta["unit"] else "")
            if f.name in lists:
                decls, kwargs, default = [flag(f.name)], {"type": ValueList()}, str(default)
                help += " Comma-separated values sweep it."
            elif isinstance(default, bool):
                decls, kwargs = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"], {}
            else:
                kind = click.Choice(meta["choices"]) if meta["choices"] else (
                    FiniteFloat() if isinstance(default, float) else click.STRING if isinstance(default, str)
                    else click.INT)
                decls, kwargs = [flag(f.name)], {"type": kind}
            fn = click.option(*decls, *meta["aliases"], f.name, default=default, show_default=default is not None,
                              help=help, **kwargs)(fn)
        return fn

    return decorate


def _check_type(param: click.Parameter, key: str, value, source):
    """Config-file values are typed as strictly as flags: no silent int(1.9) or float(True). Returns the value
    as the option takes it: a swept setting's number or array of numbers as its comma-separated text."""
    kind = param.type
    if isinstance(kind, ValueList):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in items):
            raise click.BadParameter(f"{source}: {key} must be a number, an array of numbers or a comma-separated "
                                     f"string of them, got {value!r}")
        return ",".join(map(str, items))
    if isinstance(param, click.Option) and param.is_flag or isinstance(kind, click.types.BoolParamType):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(kind, click.types.FloatParamType):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise click.BadParameter(f"{source}: {key} must be {want}, got {value!r}")
    return value


def given_settings(settings: dict) -> frozenset[str]:
    """The settings the user set, on the command line, in the environment or in a --config file, as opposed
    to those left at their defaults (a flag given at its default value counts as given)."""
    ctx = click.get_current_context()
    return frozenset(name for name in settings
                     if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT)


def load_config_file(ctx, param, value):
    """--config FILE: a TOML table of option defaults, keyed by flag name (command-line flags still win)."""
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
    by_key = {}
    for p in ctx.command.params:
        if p.name and p.expose_value:
            for name in [p.name, *(o.lstrip("-") for o in p.opts if o.startswith("--"))]:
                by_key[name.replace("-", "_")] = p
    unknown = sorted(k for k in table if k.replace("-", "_") not in by_key)
    if unknown:
        raise click.BadParameter(f"{value} has unknown keys: {', '.join(unknown)}")
    defaults = {}
    for key, v in table.items():
        p = by_key[key.replace("-", "_")]
        defaults[p.name] = _check_type(p, key, v, value)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


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
    from minifn.allocator import keep_freed_memory

    keep_freed_memory()  # eager CPU steps reuse their memory instead of page-faulting it back in


weights_option = click.option("--weights", type=click.Choice(["raw", "ema"]), default="raw", show_default=True,
                              help="The trained weights, or their moving average (a run trained with --ema).")


def load_model(path: str, device, tokenizer: str | None = None, weights: str = "raw"):
    """(params, model config, tokenizer, header) from a checkpoint. The tokenizer is the one recorded in
    it (or --tokenizer), and must have the sha256 the model was trained with. weights: 'raw' or 'ema'."""
    from minifn.checkpoint import load_params, trained_tokenizer

    params, config, meta = load_params(path, device, weights)
    return params, config, trained_tokenizer(meta, path, tokenizer), meta
