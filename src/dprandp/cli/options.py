"""Shared CLI helpers: parameter types that fail with one clear line."""

from __future__ import annotations

import json
import math

import click


def emit_json(obj: dict) -> None:
    """Print one JSON object (NaN/inf written as strings so the output stays valid JSON)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v

    click.echo(json.dumps({k: clean(v) for k, v in obj.items()}))


def positive_float(name: str):
    def convert(ctx, param, value):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise click.BadParameter(f"{name} must be a finite number > 0, got {value}", ctx, param)
        return value

    return convert
