"""Click parameter types the commands share."""

from __future__ import annotations

import math

import click


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and inf as a usage error (exit 2). Click's FLOAT and FloatRange let
    them through (every comparison with nan is false), and a nan temperature or learning rate only shows up
    later as a crash or as silent nonsense. Takes FloatRange's bounds; with none it is any finite float."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        """The bounds for --help; none without bounds (FloatRange would print 'x<=None'). Overrides a private
        click method (click 8.1-8.3); tests/test_cli.py's help test notices if it stops being called."""
        return "" if self.min is None and self.max is None else super()._describe_range()


class ValueList(click.types.StringParamType):
    """The comma-separated values of a swept setting, as text for the command to split. A config file may give
    them as a number, an array of numbers or that text."""

    name = "values"
