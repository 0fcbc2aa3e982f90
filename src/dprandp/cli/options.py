"""Shared CLI helpers: parameter types that fail with one clear line."""

from __future__ import annotations

import json
import math

import click


def emit_json(obj: dict) -> None:
    """Print one strict JSON object: NaN and infinities, at any depth, are written as strings
    ("nan", "inf", "-inf"), since the bare tokens Python would write are not JSON."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    click.echo(json.dumps(clean(obj), allow_nan=False))


def positive_float(name: str):
    def convert(ctx, param, value):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise click.BadParameter(f"{name} must be a finite number > 0, got {value}", ctx, param)
        return value

    return convert
