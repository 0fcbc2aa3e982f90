"""The up-front memory check's lower bound against the measured peak of a real DP chunk (CPU).

``dprandp train`` / ``run`` refuse a physical chunk whose lower bound (autograd's saved activations
per view, measured on the model, times p * K views, plus the views; ``dprandp.privacy.memory``)
exceeds the free memory, and warn when the bound times the route's ``PEAK_FACTOR`` does. Both are only
right if the bound is below the real peak and the factor above the real ratio. This measures, for
the presets' models and chunks, in a fresh process each (no heap reused from earlier work):

* the bound, as the check computes it;
* the peak RSS of one ``clip_and_sum`` of the chunk over the RSS before it (Linux: the peak is reset
  through ``/proc/self/clear_refs`` just before), the views already in memory.

    python bench/memory_bound.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._report import write_section  # noqa: E402
from dprandp.privacy.memory import PEAK_FACTOR  # noqa: E402

#: (label, model, head_pool, physical batch p, views K, method, precision)
CASES = (
    ("`demo` preset", "wrn-10-1", 4, 128, 1, "layerwise", "fp32"),
    ("`cpu` preset", "wrn-16-1", 4, 250, 2, "layerwise", "fp32"),
    ("`cpu` preset, bf16", "wrn-16-1", 4, 250, 2, "layerwise", "bf16"),
    ("`cpu` model, K = 8", "wrn-16-1", 4, 64, 8, "layerwise", "fp32"),
    ("`cpu` model, vmap route", "wrn-16-1", 4, 64, 2, "vmap", "fp32"),
    ("`paper` model (WRN-16-4), K = 16", "wrn-16-4", 1, 16, 16, "layerwise", "fp32"),
)

PROBE = textwrap.dedent("""
    import json, sys, time, torch
    from dprandp.models import create_model
    from dprandp.privacy.clipping import clip_and_sum
    from dprandp.privacy.memory import chunk_bytes_lower_bound, saved_bytes_per_view
    name, pool, p, k, method, precision = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    def rss(key):
        return 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
    m = create_model(name, head_pool=pool, num_classes=10, seed=0)
    x, y = torch.rand(p, k, 3, 32, 32), torch.zeros(p, dtype=torch.long)
    clip_and_sum(m, x[:1], y[:1], max_grad_norm=1.0, method=method, precision=precision)  # warm-up
    per_view = saved_bytes_per_view(m, (3, 32, 32), precision=precision)
    bound = chunk_bytes_lower_bound(per_view, (3, 32, 32), physical_batch_size=p, augmult=k)
    open("/proc/self/clear_refs", "w").write("5")
    before, t0 = rss("VmRSS"), time.perf_counter()
    clip_and_sum(m, x, y, max_grad_norm=1.0, method=method, precision=precision)
    print(json.dumps({"per_view": per_view, "bound": bound, "views": x.numel() * 4,
                      "peak": rss("VmHWM") - before, "seconds": time.perf_counter() - t0}))
""")


def measure(case) -> dict:
    _, name, pool, p, k, method, precision = case
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps([name, pool, p, k, method, precision])],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    t0 = time.perf_counter()
    lines = ["## Memory check: the lower bound against a real chunk's peak (bench/memory_bound.py)", "",
             "One `clip_and_sum` of a physical chunk (p samples x K views, 32-px images, 10 classes) in a fresh "
             "process, 1 thread. Bound: what the up-front check computes (saved activations per view x p K, plus "
             "the views); the real peak holds the views already, so they are left out of both columns below. "
             "Peak: RSS high-water mark during the chunk over the RSS before it.", "",
             "| case | model | p x K | route | precision | saved per view | bound | measured peak | peak / bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    ratios, by_route = [], {}
    for case in CASES:
        label, name, _, p, k, method, precision = case
        r = measure(case)
        bound = r["bound"] - r["views"]
        ratio = r["peak"] / bound
        ratios.append(ratio)
        by_route[method] = max(by_route.get(method, 0.0), ratio)
        lines.append(f"| {label} | {name} | {p} x {k} | {method} | {precision} | {r['per_view'] / 1e6:.3f} MB | "
                     f"{bound / 1e6:.0f} MB | {r['peak'] / 1e6:.0f} MB | {ratio:.2f}x |")
    verdicts = "; ".join(f"{route}: largest ratio {worst:.2f}x, `PEAK_FACTOR` {PEAK_FACTOR[route]:g} "
                         + ("(above it)" if worst <= PEAK_FACTOR[route] else "(BELOW it: raise it)")
                         for route, worst in by_route.items())
    lines += ["", ("Every peak is above its bound" if min(ratios) >= 1 else "A peak is BELOW its bound")
              + f" (min ratio {min(ratios):.2f}x): a refused chunk could not have run. Warning factors: {verdicts}. "
              "bf16 keeps the bound's saved activations in half the bytes but float32 gradients and casts, hence "
              "its larger ratio. On a GPU the caching allocator's peak (not measured here) differs.", "",
              f"Bench wall time: {(time.perf_counter() - t0) / 60:.1f} min."]
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("memory_bound", text)


if __name__ == "__main__":
    main()
