"""Wall time and accuracy of one whole `dprandp run` command, run as a user would run it.

    python bench/pipeline_run.py            # the README's first command (the offline demo), Phase I included
    python bench/pipeline_run.py --cached   # the demo reusing ~/.cache/dprandp (Phases II + III only)
    python bench/pipeline_run.py --section run_cpu_cifar10 -- --preset cpu --dataset cifar10 \
        --data ../shared/data/cifar10.npz --epsilon 1 --no-cache --threads 1

Everything after ``--`` is passed to ``dprandp run``. The command runs in a temporary working
directory with its own prior cache (unless --cached), so Phase I is really run and timed. Each
line it logs is stamped with the time since start, which splits the wall time into Phase I (up to
the first line of the private phases) and Phases II + III.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402


def run_timed(argv: list[str], cwd: Path, env: dict) -> tuple[dict, float, list[tuple[float, str]]]:
    """Run ``dprandp run ARGV --json``; return its summary, the wall time and the stamped log lines."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dprandp", "run", *argv, "--json", "--no-progress"], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # stdout holds one JSON line, so it cannot fill the pipe meanwhile
        lines.append((time.time() - t0, line.rstrip()))
        print(f"[{lines[-1][0] / 60:6.1f} min] {line.rstrip()}", file=sys.stderr, flush=True)
    out = proc.stdout.read()
    wall = time.time() - t0
    if proc.wait() != 0:
        raise SystemExit("dprandp run failed:\n" + "\n".join(text for _, text in lines[-20:]))
    return json.loads(out.strip().splitlines()[-1]), wall, lines


def phase1_seconds(lines: list[tuple[float, str]]) -> float | None:
    """Seconds until the private phases begin: the first log line not about Phase I (None: no Phase I ran)."""
    if not any(text.startswith("dprandp: Phase I: pretraining") for _, text in lines):
        return None
    seen = False
    for t, text in lines:
        seen = seen or text.startswith("dprandp: Phase I:")
        if seen and not text.startswith("dprandp: Phase I:"):
            return t
    return None


RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_run.jsonl"


def run_record(s: dict, work: Path, wall: float, p1: float | None, peak_gib: float, threads: int | None,
               shared: bool, load_before: float, command: str) -> dict:
    """One JSON line for bench/results/pipeline_run.jsonl (what bench/readme_results.py reads):
    the summary's numbers, the run's TrainConfig and the Phase I recipe of the prior it used."""
    import datetime as _dt

    run_dir = work / s["run_dir"]
    config = json.loads((run_dir / "config.json").read_text()).get("train", {})
    recipe = None
    if s.get("prior"):
        from dprandp.pretrain import load_prior

        _, meta = load_prior(work / s["prior"])
        recipe = meta.get("pretrain_config")
    return {"arm": "randp" if s.get("prior") else "scratch", "epsilon_target": s["target_epsilon"],
            "test_accuracy": s["test_accuracy"], "test_accuracy_flip": s.get("test_accuracy_flip"),
            "epsilon": s["epsilon"], "wall_s": round(wall, 1), "phase1_s": None if p1 is None else round(p1, 1),
            "peak_rss_gib": round(peak_gib, 2), "threads": threads, "cores_shared_with_another_run": shared,
            "load_before": round(load_before, 2), "prior_sha256": s.get("prior_sha256"), "prior_recipe": recipe,
            "command": command, "config": config, "date": _dt.date.today().isoformat(),
            "code_version": s.get("code_version")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", action="store_true", help="keep the user's prior cache (skip Phase I if cached)")
    ap.add_argument("--section", default="demo_run", help="BENCHMARKS.md section to write")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md (the run is still recorded)")
    ap.add_argument("--shared", action="store_true",
                    help="another job holds cores during this run (recorded, so it is not quoted as 'alone')")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the run is appended to")
    ap.add_argument("run_args", nargs="*", help="arguments of `dprandp run` (after --)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-run-"))
    env = dict(os.environ)
    if not args.cached:
        env["DPRANDP_CACHE"] = str(work / "cache")
    argv = [str(Path(a).resolve()) if a.startswith("../") else a for a in args.run_args]
    load_before = os.getloadavg()[0]
    s, wall, lines = run_timed(argv, work, env)
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # kB on Linux
    p1 = phase1_seconds(lines)
    given = next((args.run_args[i + 1] for i, a in enumerate(args.run_args[:-1]) if a == "--threads"), None)
    threads_note = (f"--threads {given}" if given else
                    next((t for _, t in lines if "thread" in t), "torch's default").replace("dprandp: ", ""))
    command = "dprandp run" + (" " + shlex.join(args.run_args) if args.run_args else "")
    dataset = s.get("dataset", "digits")
    split = (f"{p1 / 60:.1f} min + {(wall - p1) / 60:.1f} min" if p1 is not None
             else f"cached prior + {wall / 60:.1f} min")
    title = ("`dprandp run` (no arguments: the offline demo)" if not args.run_args
             else f"`{command}`, Phase I included")
    flip = f" ({100 * s['test_accuracy_flip']:.2f} % with flip TTA)" if s.get("test_accuracy_flip") is not None else ""
    md = (f"## {title}\n\n"
          f"| Phase I | test accuracy ({dataset}, n = {s['num_test']}) | ε (δ = {s['delta']:g}) | DP steps (II + III) "
          f"| wall time, whole command | Phase I + Phases II-III | peak RSS |\n| --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {'cached prior' if args.cached else 'included'} | {100 * s['test_accuracy']:.2f} %{flip} | {s['epsilon']:.3f} "
          f"| {s['steps']} ({s['phase2_steps_done']} + {s['phase3_steps_done']}) | {wall / 60:.1f} min | {split} "
          f"| {peak_gib:.1f} GiB |\n\n"
          f"One run (one command, image generation and Phase I included), noise from OS entropy; the final EMA "
          f"model's test accuracy. Load average before the run: {load_before:.1f}; threads: {threads_note}.")
    print(md)
    record = run_record(s, work, wall, p1, peak_gib, int(given) if given else None, args.shared, load_before, command)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    if args.results.resolve() == RESULTS.resolve():
        from bench.readme_results import render_into

        render_into()  # the README's results table follows the new run
    if not args.no_write:
        write_section(args.section, md, command="python bench/pipeline_run.py" + (" --cached" if args.cached else "")
                      + (f" --section {args.section}" if args.section != "demo_run" else "")
                      + (" -- " + shlex.join(args.run_args) if args.run_args else ""))


if __name__ == "__main__":
    main()
