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

