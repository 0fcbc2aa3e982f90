"""Wall time and accuracy of the README's first command, `dprandp run` with no arguments.

    python bench/demo_run.py            # fresh prior cache (Phase I included), then BENCHMARKS.md
    python bench/demo_run.py --cached   # reuse ~/.cache/dprandp (Phases II + III only)

Runs the real console command in a temporary working directory, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", action="store_true", help="keep the user's prior cache (skip Phase I if cached)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    env = dict(os.environ)
    if not args.cached:
        env["DPRANDP_CACHE"] = str(work / "cache")
    load_before = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "dprandp", "run", "--json", "--no-progress"], cwd=work, env=env,
                       capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    s = json.loads(r.stdout.strip().splitlines()[-1])
    threads_note = next((line for line in r.stderr.splitlines() if "busy" in line), "torch default threads")
    md = (f"## `dprandp run` (no arguments: the offline demo)\n\n"
          f"| Phase I | test accuracy (digits, n = {s['num_test']}) | ε (δ = {s['delta']:g}) | DP steps (II + III) "
          f"| wall time, whole command |\n| --- | --- | --- | --- | --- |\n"
          f"| {'cached prior' if args.cached else 'included'} | {100 * s['test_accuracy']:.2f} % | {s['epsilon']:.3f} "
          f"| {s['steps']} ({s['phase2_steps_done']} + {s['phase3_steps_done']}) | {wall / 60:.1f} min |\n\n"
          f"One run, noise from OS entropy (accuracy varies by several points between runs). Load average "
          f"before the run: {load_before:.1f} (a shared machine); threads: {threads_note.replace('dprandp: ', '')}.")
    print(md)
    if not args.no_write:
        write_section("demo_run", md, command="python bench/demo_run.py" + (" --cached" if args.cached else ""))


if __name__ == "__main__":
    main()
