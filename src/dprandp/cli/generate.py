"""``dprandp generate``: render a random process to a .npy store (Phase I data)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from dprandp.cli.options import emit_json
from dprandp.errors import require


@click.command("generate")
@click.option("--process", "process", default="stylegan-oriented", show_default=True,
              help="random process (see --list)")
@click.option("--num", type=int, default=None, help="number of images (required unless --list)")
@click.option("--size", type=int, default=64, show_default=True,
              help="image side in pixels (>= 64 keeps Phase I's 32 px random crops sharp)")
@click.option("--seed", type=int, default=0, show_default=True, help="dataset seed; image i depends on (seed, i)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="output .npy file, uint8 (num, size, size, 3)")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also save a PNG grid of the first 64 images")
@click.option("--workers", type=int, default=1, show_default=True,
              help="processes rendering in parallel (output bytes do not depend on it)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out / --grid")
@click.option("--no-progress", is_flag=True, help="no progress bar (it is off anyway when stderr is not a terminal)")
@click.option("--list", "list_only", is_flag=True, help="list the random processes and exit")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def command(process, num, size, seed, out, grid, workers, overwrite, no_progress, list_only, as_json) -> None:
    """Render NUM images of a random process to one .npy array that numpy.load(..., mmap_mode="r") opens."""
    from dprandp.processes import describe_process, list_processes

    if list_only:
        names = list_processes()
        width = max(len(n) for n in names)
        for name in names:
            click.echo(f"{name:<{width}}  {describe_process(name)}")
        return
    from dprandp.processes.store import TERMINATED, GenerateRequest, check_request, generate

    require(num is not None, "--num is required (or pass --list)")
    require(out is not None, "--out is required (or pass --list)")
    req = GenerateRequest(process=process, num=num, size=size, seed=seed, out=out, workers=workers,
                          overwrite=overwrite, grid=grid)
    check_request(req)
    try:
        summary = generate(req, progress=False if no_progress else None)
    except KeyboardInterrupt:  # not the DP-run message of `dprandp train`: generate has no run directory to resume
        _interrupted("interrupted", out, 130)
    except SystemExit as exc:
        if exc.code != TERMINATED:
            raise
        _interrupted("terminated (SIGTERM)", out, TERMINATED)
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"wrote {summary['out']}: {num} x {size} x {size} x 3 uint8 ({process}, seed {seed}) "
                   f"in {summary['seconds']:.1f} s ({summary['images_per_s']:.0f} img/s)"
                   + (f"; grid {summary['grid']}" if summary["grid"] else ""))


def _interrupted(what: str, out: Path, code: int) -> NoReturn:
    """One line and exit status ``code``: the temporary store is gone and OUT untouched, so rerunning is all."""
    import sys

    from dprandp.cli.main import fail

    if sys.stderr.isatty():  # after the terminal's "^C" (and a progress bar), on a line of its own
        click.echo(err=True)
    fail(f"{what}; nothing was written to {out}: run the same command again to generate it", code=code)
