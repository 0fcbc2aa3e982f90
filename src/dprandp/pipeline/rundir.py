"""The run directory: creation without clobbering, atomic file writes, the metrics log.

Layout of a finished run::

    RUN_DIR/config.json      the TrainConfig plus what was derived from it (q, sigma, N)
    RUN_DIR/ledger.jsonl     privacy ledger, one line per DP step (dprandp.pipeline.ledger)
    RUN_DIR/metrics.jsonl    per step: phase, loss, train accuracy, lr, epsilon so far
    RUN_DIR/checkpoint.pt    latest resumable state (removed once the run is complete)
    RUN_DIR/model.pt         the final EMA model, with its architecture (for `dprandp evaluate`)
    RUN_DIR/summary.json     test accuracy, epsilon, delta, sigma, q, steps, N, dataset, prior ...
    RUN_DIR/report.html      self-contained report (plots inlined), plus *.png plots

Every file that is replaced (config, checkpoint, model, summary, report) is written to a temporary
name, fsynced and renamed over the old one, so a crash leaves the old version or the new one,
never half of either.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

from dprandp.errors import InputError, require

#: Files whose presence marks a directory as a dprandp run (the only kind --overwrite deletes).
RUN_MARKERS = ("config.json", "ledger.jsonl")


def check_run_dir(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse early (before any expensive work) what :func:`prepare_run_dir` would refuse."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists():
            require(parent.is_dir(), f"cannot create run directory {p}: {parent} is not a directory")
            require(os.access(parent, os.W_OK | os.X_OK), f"cannot create run directory {p}: {parent} is not writable")
            break
    if p.is_dir() and any(p.iterdir()):
        require(not (overwrite and p.is_symlink()), f"--overwrite refused: {p} is a symbolic link "
                f"(to {os.path.realpath(p)}); give the directory itself")
        require(overwrite, f"run directory {p} already exists; choose another --out, pass --overwrite, "
                "or continue it with `dprandp train --resume DIR`")
        require(any((p / m).exists() for m in RUN_MARKERS),
                f"--overwrite refused: {p} is not a dprandp run directory (no config.json or ledger.jsonl)")


def prepare_run_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Create ``path`` for a new run. An existing non-empty directory is refused unless
    ``overwrite`` is set *and* it is a previous dprandp run (never deletes anything else)."""
    p = Path(path)
    if p.exists():
        require(p.is_dir(), f"output path {p} exists and is not a directory")
        if any(p.iterdir()):
            if not overwrite:
                raise InputError(f"run directory {p} already exists; choose another --out, "
                                 "pass --overwrite, or continue it with `dprandp train --resume DIR`")
            require(any((p / m).exists() for m in RUN_MARKERS),
                    f"--overwrite refused: {p} is not a dprandp run directory (no config.json or ledger.jsonl)")
            require(not p.is_symlink(), f"--overwrite refused: {p} is a symbolic link; give the directory itself")
            shutil.rmtree(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to run directory {p}: {exc.strerror or exc}") from None
    return p


@contextmanager
def run_dir_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the run directory while a process trains into it.

    Two processes on one run (a scheduler requeueing a job whose first copy still runs, or two
    ``--resume`` by hand) would each append DP steps to the ledger while each reports only its own
    budget. The lock (``flock`` on the directory itself, so no lock file is left behind) is released
    when the process ends, however it ends. Where ``flock`` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"run directory {path} is in use by another process (it holds the run's lock); "
                             "wait for it to finish or stop it first") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: tmp file, fsync, rename, fsync the directory.

    On failure (disk full, permissions) the temporary file is removed and the old file is left
    as it was; the error becomes one :class:`InputError` line.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise InputError(f"could not write {p}: {exc.strerror or exc}") from None
    fsync_dir(p.parent)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: str | os.PathLike, obj) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    require(p.exists(), f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{what} {p} is corrupt (not valid JSON)") from None


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed (not privacy-critical,
    so no fsync per line; a resumed run truncates it to the checkpoint's step)."""

    NAME = "metrics.jsonl"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME

    def append(self, obj: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(obj, sort_keys=True) + "\n")
        except OSError as exc:
            raise InputError(f"could not write {self.path}: {exc.strerror or exc}") from None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
        return out

    def truncate_after(self, step: int) -> None:
        """Keep only records of steps <= ``step`` (the ones the resumed model contains)."""
        keep = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())


def code_version() -> str:
    """Package version, plus the git commit (and '+dirty') when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("dprandp")
    except PackageNotFoundError:  # pragma: no cover
        v = "unknown"
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0 and commit.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=5)
            v += f"+g{commit.stdout.strip()}" + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v
