"""Prior files and training-state files of Phase I.

Two files per run, both rewritten atomically (temporary file, fsync, ``os.replace``) at the end of
every epoch, so an interruption never leaves a truncated file:

* the **prior** ``PRIOR.pt`` — what Phases II/III need: the trunk's weights, the WRN config, and the
  provenance of the weights (process, number of images, epochs, seed, code version, date). It is
  small (the trunk only) and valid after every epoch.
* the **training state** ``PRIOR.pt.state`` — what ``--resume`` needs on top: projection head,
  optimizer (momentum buffers), scheduler, the random generators and the epoch. With the paper's
  4096-wide head it weighs ~700 MB, which is why it is kept out of the prior.

Everything is stored as tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from dprandp.errors import InputError, require

PRIOR_FORMAT = "dprandp-prior/1"
STATE_FORMAT = "dprandp-pretrain-state/1"
#: WRNConfig fields that determine the trunk's parameters (num_classes does not).
TRUNK_FIELDS = ("depth", "width", "groups", "in_channels")


def state_path(out: str | os.PathLike) -> Path:
    """Where the training state of the prior ``out`` lives."""
    out = Path(out)
    return out.with_name(out.name + ".state")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise InputError(f"cannot write {str(path)!r} (disk full, quota or file-size limit?): {reason}") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def code_version() -> str:
    """Package version, plus ``git describe`` of the source tree when it is a git checkout."""
    try:
        from importlib.metadata import version

        v = version("dprandp")
    except Exception:  # pragma: no cover
        v = "unknown"
    try:
        desc = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
        if desc.returncode == 0 and desc.stdout.strip():
            v += f"+git.{desc.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        pass
    return v


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _load(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{what} {str(path)!r} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} {str(path)!r} is not a dprandp checkpoint")
    return obj


def load_prior(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a prior file: ``(trunk_state_dict, meta)``; meta has ``model``, ``wrn_config``, ``provenance``."""
    obj = _load(path, "prior")
    if obj.get("format") != PRIOR_FORMAT or "trunk" not in obj:
        raise InputError(f"prior {str(path)!r} is not a dprandp prior (format {obj.get('format')!r})")
    meta = {k: v for k, v in obj.items() if k != "trunk"}
    return obj["trunk"], meta


def load_state(path: str | os.PathLike) -> dict:
    obj = _load(path, "training state")
    if obj.get("format") != STATE_FORMAT:
        raise InputError(f"{str(path)!r} is not a dprandp pretraining state (format {obj.get('format')!r})")
    return obj


def _arch(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in TRUNK_FIELDS}


def check_architecture(expected: dict, found: dict, where: str) -> None:
    """InputError naming the differing fields when two WRN configs build different trunks."""
    a, b = _arch(expected), _arch(found)
    if a != b:
        diff = ", ".join(f"{k} {b[k]} vs {a[k]}" for k in TRUNK_FIELDS if a[k] != b[k])
        raise InputError(f"{where} is for another architecture ({diff})")


def apply_prior(model, path_or_prior) -> list[str]:
    """Load a prior's trunk weights into ``model.trunk`` (a :class:`~dprandp.models.WideResNet`).

    ``path_or_prior`` is a path, or the ``(trunk_state_dict, meta)`` pair of :func:`load_prior`.
    The architectures must match (else :class:`InputError`). Returns the names of the parameters the
    prior does not provide (those under ``WideResNet.PRIOR_LACKS``: final norm and head), which is
    what Phase II trains.
    """
    if isinstance(path_or_prior, (str, os.PathLike)):
        trunk, meta = load_prior(path_or_prior)
        where = f"prior {str(path_or_prior)!r}"
    else:
        trunk, meta = path_or_prior
        where = "prior"
    check_architecture(model.config.to_dict(), meta.get("wrn_config", {}), where)
    bad = [k for k, v in trunk.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    require(not bad, f"{where} holds non-finite weights ({', '.join(bad[:2])}{', ...' if len(bad) > 2 else ''}): "
            "its Phase I diverged; pretrain it again with a lower learning rate")
    try:
        model.trunk.load_state_dict(trunk, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{where} does not fit the model's trunk: {str(exc).splitlines()[0]}") from None
    return [n for n, _ in model.named_parameters() if n.startswith(type(model).PRIOR_LACKS)]


def prior_dict(trunk, *, model_name: str, wrn_config: dict, provenance: dict, config: dict) -> dict:
    return {
        "format": PRIOR_FORMAT,
        "trunk": {k: v.detach().to("cpu", copy=True) for k, v in trunk.state_dict().items()},
        "model": model_name,
        "wrn_config": dict(wrn_config),
        "provenance": dict(provenance),
        "pretrain_config": dict(config),
    }
