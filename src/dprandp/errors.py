"""User-facing errors.

Library code raises :class:`InputError` for anything a user can fix (a bad flag, a missing
file, an impossible privacy budget). The CLI turns it into one line on stderr and exit status 2;
library users catch it like any ``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Invalid input from the user: the message names the problem in one line."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`InputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


def check_writable(path: Path, what: str, overwrite: bool) -> None:
    """Refuse, with one line, to write ``path`` where it would fail or replace a file without ``overwrite``."""
    parent = path.parent if str(path.parent) else Path(".")
    require(parent.is_dir(), f"{what} {path}: {parent} is not a directory" if parent.exists() else
            f"{what} {path}: directory {parent} does not exist")
    require(os.access(parent, os.W_OK | os.X_OK), f"{what} {path}: directory {parent} is not writable")
    require(not path.is_dir(), f"{what} {path} is a directory")
    if path.exists():
        require(overwrite, f"{what} {path} already exists (pass --overwrite to replace it)")
        require(os.access(path, os.W_OK), f"{what} {path} exists and is not writable")


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *,
                       deletes_tree: bool = False, trees: tuple[str, ...] = ()) -> None:
    """Refuse an output that is one of the inputs (``--overwrite`` would destroy it), or, when
    writing ``out`` replaces a whole directory (``deletes_tree``), an input that lies inside it; and
    an output inside an input read as a folder tree (flags in ``trees``, e.g. class folders: the
    run's files would become images, or a class, of the next read)."""
    target = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        src = Path(path).resolve()
        require(src != target, f"{flag} {path} is also the output: choose another output path")
        if flag in trees:
            require(src not in target.parents,
                    f"the output {out} lies inside {flag} {path}, whose folders are read as classes: a later "
                    "read would take the output's files for images; choose an output outside it")
        if deletes_tree:
            require(target not in src.parents,
                    f"{flag} {path} lies inside the output directory {out}, which --overwrite would delete")
