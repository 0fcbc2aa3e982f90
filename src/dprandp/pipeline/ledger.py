"""The privacy ledger: an append-only record of every DP step, the single source of "epsilon so far".

Why a file and not a counter: a process can die at any instruction. Each DP step's record is
written, flushed and fsynced *before* that step's noisy update is applied to the model (the
trainer calls :meth:`PrivacyLedger.record_step` from the engine's ``before_update`` hook). So
whatever happens, the ledger holds at least every step whose update reached the model: epsilon
computed from it can only be over-counted, never under-counted. A resumed run keeps counting the
records beyond its last checkpoint (steps whose updates were lost still spent privacy).

Format: JSON lines. The first line is a header (``"kind": "run"``: target budget, accountant,
noise seeding); then one ``"kind": "step"`` line per DP step (``phase``, ``step``,
``sample_rate``, ``noise_multiplier``, ``max_grad_norm``, ``time``); ``"kind": "resume"`` lines
mark restarts. Consecutive steps with the same sample rate and noise form one
:class:`~dprandp.accounting.DPPhase` for the accountant.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dprandp.accounting import (
    ACCOUNTANTS,
    PLD_COARSE,
    DPPhase,
    compute_epsilon,
    pld_interval,
    rdp_bound,
    step_loss_range,
    steps_by_mechanism,
)
from dprandp.errors import InputError, require
from dprandp.pipeline.rundir import fsync_dir as _fsync_dir

LEDGER_NAME = "ledger.jsonl"


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """One DP step as the ledger stores it."""

    phase: str
    step: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    time: float


def group_phases(records: list[StepRecord]) -> list[DPPhase]:
    """Consecutive records with equal (sample_rate, noise_multiplier) -> one DPPhase each.

    One DPPhase per run of records, not per record: the ledger groups all its records after every
    step, and at 1e5 records a DPPhase per record took 0.3 s a step."""
    runs = itertools.groupby(records, key=lambda r: (r.sample_rate, r.noise_multiplier))
    return [DPPhase(sample_rate=q, noise_multiplier=sigma, steps=sum(1 for _ in run)) for (q, sigma), run in runs]


class PrivacyLedger:
    """Append-only DP step ledger of one run directory.

    Use :meth:`create` for a new run and :meth:`open` to continue one (``--resume``).
    :meth:`epsilon` and :meth:`epsilon_after_next` always read the records, never a counter.
    """

    def __init__(self, path: Path, header: dict, records: list[StepRecord]) -> None:
        self.path = Path(path)
        self.header = header
        self.records = records
        self._eps_cache: dict[tuple, float] = {}
        self._plan: list[DPPhase] | None = None
        self._step_plds: dict[tuple[float, float, float], object] = {}  # (q, sigma, grid) -> one step's PLD

    # ------------------------------------------------------------------ creation / loading
    @classmethod
    def create(cls, run_dir: str | os.PathLike, *, target_epsilon: float, target_delta: float,
               accountant: str, deterministic_noise: bool) -> "PrivacyLedger":
        path = Path(run_dir) / LEDGER_NAME
        require(not path.exists(), f"a ledger already exists at {path}; use --resume to continue that run")
        header = {"kind": "run", "target_epsilon": target_epsilon, "target_delta": target_delta,
                  "accountant": accountant, "deterministic_noise": bool(deterministic_noise),
                  "noise_seed_source": "--seed" if deterministic_noise else "os-entropy",
                  "time": time.time()}
        ledger = cls(path, header, [])
        ledger._append(header)
        _fsync_dir(path.parent)
        return ledger

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> "PrivacyLedger":
        """Read an existing ledger. A torn last line (the process died while writing it) is
        counted as one more step with the previous record's parameters, and rewritten whole. A
        line that is not JSON, or a malformed header or step record, is refused with one line
        naming the file and the problem; the file is left as it is."""
        path = Path(run_dir) / LEDGER_NAME
        require(path.exists(), f"no privacy ledger at {path}")
        raw = path.read_bytes()
        header, records, torn = _parse(raw, path)
        _check_header(header, path)
        ledger = cls(path, header, records)
        if torn.strip():
            # The record was being written when the process died, so its update was never applied;
            # counting it anyway keeps epsilon an over-estimate. Rewrite the file without the torn
            # bytes, then append the conservative copy.
            with open(path, "r+b") as f:
                f.truncate(len(raw) - len(torn))
                f.flush()
                os.fsync(f.fileno())
            if records:
                last = records[-1]
                ledger.record_step(phase=last.phase, step=last.step + 1, sample_rate=last.sample_rate,
                                   noise_multiplier=last.noise_multiplier, max_grad_norm=last.max_grad_norm,
                                   extra={"recovered_torn_record": True})
        return ledger

    # ----------------------------------------------------------------------------- writing
    def _append(self, obj: dict) -> None:
        line = (json.dumps(obj, sort_keys=True) + "\n").encode()
        try:
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # Raised inside the engine's before_update hook: the step's update is never applied.
            raise InputError(f"could not write the privacy ledger {self.path} ({exc.strerror or exc}); "
                             "the step was not applied; free space and --resume the run") from None

    def record_step(self, *, phase: str, step: int, sample_rate: float, noise_multiplier: float,
                    max_grad_norm: float, extra: dict | None = None) -> StepRecord:
        """Append one DP step durably (returns after fsync). Call before applying the update."""
        rec = StepRecord(phase=phase, step=int(step), sample_rate=float(sample_rate),
                         noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
                         time=time.time())
        obj = {"kind": "step", **rec.__dict__, "deterministic_noise": self.deterministic_noise}
        if extra:
            obj.update(extra)
        self._append(obj)
        self.records.append(rec)
        return rec

    def record_resume(self, *, from_step: int) -> None:
        """Mark a restart: steps recorded beyond ``from_step`` were spent but their updates lost."""
        self._append({"kind": "resume", "from_step": int(from_step), "ledger_steps": len(self.records),
                      "lost_steps": max(0, len(self.records) - int(from_step)), "time": time.time()})

    # ----------------------------------------------------------------------------- reading
    @property
    def deterministic_noise(self) -> bool:
        return bool(self.header.get("deterministic_noise", False))

    @property
    def target_epsilon(self) -> float:
        return float(self.header["target_epsilon"])

    @property
    def target_delta(self) -> float:
        return float(self.header["target_delta"])

    @property
    def accountant(self) -> str:
        return str(self.header.get("accountant", "pld"))

    @property
    def steps(self) -> int:
        return len(self.records)

    def phases(self) -> list[DPPhase]:
        return group_phases(self.records)

    def _epsilon_of(self, phases: list[DPPhase]) -> float:
        key = _phases_key(phases)
        if key not in self._eps_cache:
            self._eps_cache[key] = compute_epsilon(phases, target_delta=self.target_delta,
                                                   accountant=self.accountant) if phases else 0.0
        return self._eps_cache[key]

    def epsilon(self) -> float:
        """Epsilon spent by every step in the ledger (at the run's target delta)."""
        return self._epsilon_of(self.phases())

    def epsilon_after_next(self, *, sample_rate: float, noise_multiplier: float) -> float:
        """Epsilon the ledger would show after one more step with these parameters."""
        probe = StepRecord(phase="?", step=-1, sample_rate=float(sample_rate),
                           noise_multiplier=float(noise_multiplier), max_grad_norm=1.0, time=0.0)
        return self._epsilon_of(group_phases(self.records + [probe]))

    def set_plan(self, phases: list[DPPhase]) -> float:
        """Register the run's planned schedule; returns its epsilon (the accountant's, fine grid).

        A step whose ledger-plus-step is a prefix of a plan within the target is allowed without
        recomputing epsilon: composing fewer of the same mechanisms never spends more (a prefix
        of the transcript is a post-processing of the whole), and the accountant's pessimistic
        PLD keeps that order. Anything else (lost steps, other noise) is computed exactly.
        """
        merged: list[DPPhase] = []
        for p in phases:
            if p.steps == 0:
                continue
            if merged and (merged[-1].sample_rate, merged[-1].noise_multiplier) == (p.sample_rate, p.noise_multiplier):
                merged[-1] = DPPhase(sample_rate=p.sample_rate, noise_multiplier=p.noise_multiplier,
                                     steps=merged[-1].steps + p.steps)
            else:
                merged.append(p)
        self._plan = merged
        return self._epsilon_of(self._plan)

    def _is_plan_prefix(self, phases: list[DPPhase]) -> bool:
        plan = self._plan
        if not plan or len(phases) > len(plan):
            return False
        for i, p in enumerate(phases):
            q = plan[i]
            if (p.sample_rate, p.noise_multiplier) != (q.sample_rate, q.noise_multiplier):
                return False
            if p.steps > q.steps or (i < len(phases) - 1 and p.steps != q.steps):
                return False
        return True

    def allows_next(self, *, sample_rate: float, noise_multiplier: float) -> bool:
        """Whether one more step stays within the target epsilon."""
        probe = StepRecord(phase="?", step=-1, sample_rate=float(sample_rate),
                           noise_multiplier=float(noise_multiplier), max_grad_norm=1.0, time=0.0)
        phases = group_phases(self.records + [probe])
        if self._is_plan_prefix(phases) and self._epsilon_of(self._plan) <= self.target_epsilon:
            return True
        eps = self._epsilon_of(phases)
        return math.isfinite(eps) and eps <= self.target_epsilon

    def epsilon_upper_bound(self) -> float:
        """A certified upper bound on :meth:`epsilon`, cheap enough for every step's metrics.

        * :meth:`epsilon` itself where it is already computed: at the end of the plan (set_plan
          computed it) and after each step off the plan (allows_next computed it): the same number
          as the run's final epsilon.
        * Otherwise the smallest of three upper bounds: the PLD on a grid 3x coarser next to one
          step's privacy loss than :meth:`epsilon`'s (within ~0.1 % of it; each (q, sigma) step's
          PLD built once per grid and self-composed), the RDP bound (per-step RDP cached) and, for
          a prefix of the plan, the plan's epsilon (fewer of the planned steps never spend more):
          so the plotted curve of a run that stays on its plan never crosses its planned epsilon.
        * :meth:`epsilon` where none of these is finite (a delta below the PLD's truncated tail mass).
        """
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        phases = self.phases()
        key = _phases_key(phases)
        if key in self._eps_cache:
            return self._eps_cache[key]
        live = [p for p in phases if p.steps > 0 and p.sample_rate > 0]
        if not live:
            return 0.0
        if any(p.noise_multiplier == 0 for p in live) or self.accountant != "pld":
            return self.epsilon()
        bound = math.inf
        interval = pld_interval(live, target_delta=self.target_delta, interval=PLD_COARSE,
                                resolution=_COARSE_RESOLUTION)
        if interval is not None:
            # A power of 2 times PLD_COARSE, rounded down (finer): the grid follows epsilon as steps add
            # up, and each step PLD is then built for a handful of grids instead of one per step.
            interval = PLD_COARSE * 2.0 ** math.floor(math.log2(interval / PLD_COARSE))
            # A per-step metric must stay cheap: at most _STEP_POINTS grid points per step PLD (the grid
            # follows a Gaussian estimate of epsilon, which is low at sigma < 1, and a million-point step
            # PLD self-composed every step took 0.6 s; found in review). Coarser is still an upper bound.
            loss_range = step_loss_range(min(p.noise_multiplier for p in live))
            if loss_range / interval > _STEP_POINTS:
                interval = PLD_COARSE * 2.0 ** math.ceil(math.log2(loss_range / _STEP_POINTS / PLD_COARSE))
            total = None
            try:
                for (q, sigma), count in steps_by_mechanism(live).items():  # one self-composition each
                    if (q, sigma, interval) not in self._step_plds:
                        self._step_plds[(q, sigma, interval)] = pld_lib.from_gaussian_mechanism(
                            sigma, sampling_prob=q, value_discretization_interval=interval)
                    composed = self._step_plds[(q, sigma, interval)].self_compose(count)
                    total = composed if total is None else total.compose(composed)
                bound = float(total.get_epsilon_for_delta(self.target_delta))
            except (OverflowError, MemoryError, ValueError, ZeroDivisionError):
                bound = math.inf  # the other bounds answer
            bound = max(bound, 0.0) if not math.isnan(bound) else math.inf
        rdp = rdp_bound(live, self.target_delta)
        if rdp is not None:
            bound = min(bound, rdp)
        if self._is_plan_prefix(phases) and _phases_key(self._plan) in self._eps_cache:
            bound = min(bound, self._eps_cache[_phases_key(self._plan)])
        return bound if math.isfinite(bound) else self.epsilon()


#: epsilon_upper_bound's PLD grid as a fraction of one step's privacy loss (the accountant's
#: PLD_RESOLUTION is 0.01): its error, about (fraction)^2 / 2, stays near 0.1 % at a third of the cost.
_COARSE_RESOLUTION = 0.03

#: Most grid points of one step's PLD in the per-step metric (the RDP bound and the plan's epsilon
#: answer where this grid is the looser bound).
_STEP_POINTS = 1e5


def _phases_key(phases: list[DPPhase]) -> tuple:
    return tuple((p.sample_rate, p.noise_multiplier, p.steps) for p in phases)


def spent_budget(run_dir: str | os.PathLike) -> dict | None:
    """What the run in ``run_dir`` already spent, read before ``--overwrite`` deletes it.

    ``None`` when there is no ledger or it holds no DP step. Otherwise ``steps``, ``epsilon`` and
    ``delta`` of its ledger; a ledger that cannot be read gives ``None`` for each of them, and one
    whose lines read but whose header or step records are malformed gives its number of steps
    and ``None`` for the others (the spend is unknown, not zero). Reading never changes the file
    and never raises on its content.
    """
    path = Path(run_dir) / LEDGER_NAME
    if not path.is_file():
        return None
    try:
        header, steps, torn = _parse_lines(path.read_bytes(), path)
    except (OSError, InputError):
        return {"steps": None, "epsilon": None, "delta": None}
    if torn.strip() and steps:  # the process died writing a record: count it, as open() does
        steps.append(steps[-1])
    if not steps:
        return None
    try:
        _check_header(header, path)
        ledger = PrivacyLedger(path, header, [_step_record(obj, path, line) for line, obj in steps])
        return {"steps": len(steps), "epsilon": ledger.epsilon(), "delta": ledger.target_delta}
    except InputError:  # a malformed header or record, or one the accountant cannot compute
        return {"steps": len(steps), "epsilon": None, "delta": None}


def _parse(raw: bytes, path: Path) -> tuple[dict | None, list[StepRecord], bytes]:
    """The header, the step records and the torn last line (``b""`` if none) of a ledger's bytes;
    an InputError naming the file and line for a line that is not JSON or a malformed step record."""
    header, steps, torn = _parse_lines(raw, path)
    return header, [_step_record(obj, path, line) for line, obj in steps], torn


def _parse_lines(raw: bytes, path: Path) -> tuple[dict | None, list[tuple[int, dict]], bytes]:
    """The header, the (line number, object) of each step line and the torn last line."""
    *complete, torn = raw.split(b"\n")
    header, steps = None, []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"privacy ledger {path} is corrupt at line {i + 1}") from None
        if not isinstance(obj, dict):
            raise InputError(f"privacy ledger {path} is corrupt at line {i + 1}")
        if obj.get("kind") == "run" and header is None:
            header = obj
        elif obj.get("kind") == "step":
            steps.append((i + 1, obj))
    return header, steps, torn


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_header(header: dict | None, path: Path) -> None:
    """Refuse a header the run's epsilon cannot be computed from, naming the problem (a hand-edited
    or foreign file; the trainer always writes a valid one)."""
    require(header is not None, f"privacy ledger {path} has no header line")

    def check(ok: bool, problem: str) -> None:
        require(ok, f"privacy ledger {path} has a malformed header: {problem}")

    for key in ("target_epsilon", "target_delta"):
        check(key in header, f"no {key}")
    check(_is_number(header["target_epsilon"]) and header["target_epsilon"] > 0,
          f"target_epsilon must be a number > 0, got {header['target_epsilon']!r}")
    check(_is_number(header["target_delta"]) and 0 < header["target_delta"] < 1,
          f"target_delta must be a number in (0, 1), got {header['target_delta']!r}")
    check(header.get("accountant", "pld") in ACCOUNTANTS,
          f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {header.get('accountant')!r}")
    check(isinstance(header.get("deterministic_noise", False), bool),
          f"deterministic_noise must be true or false, got {header.get('deterministic_noise')!r}")


def _step_record(obj: dict, path: Path, line: int) -> StepRecord:
    """A step line as a StepRecord, or an InputError naming the file, the line and the problem."""

    def check(ok: bool, problem: str) -> None:
        require(ok, f"privacy ledger {path}: malformed step record at line {line}: {problem}")

    missing = [k for k in StepRecord.__dataclass_fields__ if k not in obj]
    check(not missing, f"no {', '.join(missing)}")
    check(isinstance(obj["phase"], str), f"phase must be a string, got {obj['phase']!r}")
    check(isinstance(obj["step"], int) and not isinstance(obj["step"], bool),
          f"step must be an integer, got {obj['step']!r}")
    for key in ("sample_rate", "noise_multiplier", "max_grad_norm", "time"):
        check(_is_number(obj[key]), f"{key} must be a number, got {obj[key]!r}")
    try:  # the accountant's own range checks (a sampling rate in [0, 1], a noise multiplier >= 0)
        DPPhase(sample_rate=obj["sample_rate"], noise_multiplier=obj["noise_multiplier"], steps=1)
    except InputError as exc:
        check(False, str(exc))
    return StepRecord(phase=obj["phase"], step=obj["step"], sample_rate=float(obj["sample_rate"]),
                      noise_multiplier=float(obj["noise_multiplier"]), max_grad_norm=float(obj["max_grad_norm"]),
                      time=float(obj["time"]))
