"""The run report: PNG plots and one self-contained ``report.html`` (images inlined as base64).

The report shows what a reader needs to trust the result: the final EMA model's test accuracy,
the (epsilon, delta) guarantee with the ledger's phases that produced it, the curves of accuracy
and epsilon against step, and the full configuration. It never shows private images; the only
pictures of data are the prior's synthetic random-process images.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from dprandp.pipeline.rundir import atomic_write_bytes

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:980px;margin:0 auto;padding:28px 28px 60px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:34px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;margin:0 0 22px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:10px;padding:14px 16px}
.card .k{color:#57606a;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:26px;font-weight:600;margin-top:2px} .card .n{color:#57606a;font-size:12px}
.good .v{color:#1a7f37}
table{border-collapse:collapse;background:#fff;border:1px solid #d0d7de;border-radius:8px;overflow:hidden;width:100%}
td,th{padding:6px 12px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top;font-size:14px}
th{background:#f6f8fa;font-weight:600} td.num{font-variant-numeric:tabular-nums}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#eaeef2;padding:1px 5px;border-radius:4px}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:14px} .plots img,.wide img{width:100%;background:#fff;border:1px solid #d0d7de;border-radius:8px}
.note{background:#fff8c5;border:1px solid #d4a72c66;border-radius:8px;padding:10px 14px;margin:10px 0}
.ok{background:#dafbe1;border:1px solid #1a7f3755;border-radius:8px;padding:10px 14px;margin:10px 0}
.cfg{display:grid;grid-template-columns:1fr 1fr;gap:12px} footer{color:#57606a;font-size:12px;margin-top:40px}
"""


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def make_plots(metrics: list[dict], *, target_epsilon: float, phase2_steps: int,
               prior_images: np.ndarray | None = None, ema: bool = True) -> dict[str, bytes]:
    """PNG bytes by file name: ``accuracy.png``, ``epsilon.png`` (+ ``prior_images.png``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [m for m in metrics if m.get("kind") == "step"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    out: dict[str, bytes] = {}

    def boundary(ax):
        if 0 < phase2_steps < (steps[-1]["step"] if steps else 0):
            ax.axvline(phase2_steps, color="#8c959f", ls="--", lw=1)
            ax.text(phase2_steps, ax.get_ylim()[1], " Phase III →", va="top", fontsize=8, color="#57606a")

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    if steps:
        x = np.array([m["step"] for m in steps])
        acc = np.array([m["train_accuracy"] for m in steps], dtype=float)
        w = max(1, len(acc) // 25)
        smooth = np.convolve(acc, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1:], smooth, color="#9a6700", lw=1.2, label=f"train batch (noisy model, {w}-step mean)")
    if evals:
        ax.plot([m["step"] for m in evals], [m["test_accuracy"] for m in evals], "o-", color="#0969da",
                lw=2, ms=4, label="test (EMA model)" if ema else "test")
        if any(m.get("val_accuracy") is not None for m in evals):
            ax.plot([m["step"] for m in evals], [m.get("val_accuracy") for m in evals], "s--", color="#8250df",
                    lw=1.2, ms=3, label="validation (EMA model)" if ema else "validation")
    ax.set_xlabel("DP step"), ax.set_ylabel("accuracy"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    ax.set_title("Accuracy")
    boundary(ax)
    ax.legend(fontsize=8, loc="lower right")
    out["accuracy.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    if steps:
        ax.plot([m["step"] for m in steps], [m["epsilon"] for m in steps], color="#cf222e", lw=2,
                label="ε spent (from the ledger)")
    ax.axhline(target_epsilon, color="#57606a", ls=":", lw=1.2, label=f"target ε = {target_epsilon:g}")
    ax.set_xlabel("DP step"), ax.set_ylabel("ε"), ax.set_ylim(0, target_epsilon * 1.12), ax.grid(alpha=0.3)
    ax.set_title("Privacy spent")
    boundary(ax)
    ax.legend(fontsize=8, loc="lower right")
    out["epsilon.png"] = _png(fig)
    plt.close(fig)

    if prior_images is not None and len(prior_images):
        n = min(len(prior_images), 16)
        cols = 8
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.75, rows * 0.75))
        for i, ax in enumerate(np.atleast_1d(axes).ravel()):
            ax.axis("off")
            if i < n:
                ax.imshow(prior_images[i], interpolation="nearest")
        fig.subplots_adjust(wspace=0.04, hspace=0.04)
        out["prior_images.png"] = _png(fig)
        plt.close(fig)
    return out


def _img(name: str, data: bytes) -> str:
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _auc(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def _steps_note(s: dict) -> str:
    """The DP-steps card's line: the steps the model received per phase, and why they fall short of
    the steps the ledger counts (a crash lost some) or of the plan (the budget stopped the run)."""
    applied = s.get("steps_applied", s["steps"])
    note = f"II: {s['phase2_steps_done']} · III: {s['phase3_steps_done']}"
    if applied != s["steps"]:
        note = f"{applied} applied ({note}); {s['steps'] - applied} lost in a crash, still counted"
    if s.get("stopped_early"):
        note += f"; stopped early by the budget after {applied} of {s.get('planned_steps', '?')} planned"
    return note


def render_html(summary: dict, config: dict, ledger_phases: list[dict], plots: dict[str, bytes],
                notes: list[str]) -> str:
    e = html.escape
    s = summary
    cards = [
        ("test accuracy", _pct(s["test_accuracy"]),
         f"{s.get('reported_model', 'final EMA model')}, n = {s['num_test']} (chance ≈ {100 / s['num_classes']:.0f} %)", "good"),
        ("privacy", f"ε = {s['epsilon']:.3f}", f"δ = {s['delta']:g} (target ε = {s['target_epsilon']:g})", "")
        if s.get("search_epsilon") is None else
        ("privacy (with the search)", f"ε = {s['search_epsilon']:.3f}", f"δ = {s['delta']:g}; one run alone: "
         f"ε = {s['epsilon']:.3f}", ""),
        ("noise", f"σ = {s['noise_multiplier']:.3f}", f"clip C = {s['max_grad_norm']:g}, q = {s['sample_rate']:.4g}", ""),
        ("DP steps", f"{s['steps']}", _steps_note(s), ""),
    ]
    card_html = "".join(f'<div class="card {c}"><div class="k">{e(k)}</div><div class="v">{e(v)}</div>'
                        f'<div class="n">{e(n)}</div></div>' for k, v, n, c in cards)
    prior = s.get("prior") or "none (DP-SGD from scratch)"
    rows = [("dataset", f"{s['dataset']} — {s['num_train']} private training images, {s['num_classes']} classes"),
            ("model", f"{config['model']} · prior: {prior}"),
            ("prior provenance", s.get("prior_provenance") or "–"),
            ("balanced accuracy · ROC-AUC (test)", f"{_pct(s.get('test_balanced_accuracy'))} · {_auc(s.get('test_auc'))} "
             "(mean recall over classes; MedMNIST's AUC)"),
            ("validation accuracy", _pct(s.get("val_accuracy"))),
            ("with flip test-time augmentation", f"test {_pct(s.get('test_accuracy_flip'))} · "
             f"validation {_pct(s.get('val_accuracy_flip'))} (no privacy cost: post-processing)"
             if config.get("flip", True) else "not used: the training views were not mirrored (--no-flip)"),
            ("wall time (Phases II + III)", f"{s['wall_time_s'] / 60:.1f} min"),
            ("noise seeding", "fixed seed (--deterministic-noise): reproducible, NOT for production"
             if s["deterministic_noise"] else "OS entropy (secure default)"),
            ("code version", s["code_version"])]
    info = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in rows)
    phase_rows = "".join(
        f"<tr><td class=num>{i + 1}</td><td class=num>{p['steps']}</td><td class=num>{p['sample_rate']:.5g}</td>"
        f"<td class=num>{p['noise_multiplier']:.4f}</td></tr>" for i, p in enumerate(ledger_phases))
    items = sorted(config.items())
    half = (len(items) + 1) // 2
    cfg_tables = "".join("<table>" + "".join(f"<tr><th>{e(k)}</th><td><code>{e(json_value(v))}</code></td></tr>"
                                             for k, v in part) + "</table>" for part in (items[:half], items[half:]))
    note_html = "".join(f'<div class="note">{e(n)}</div>' for n in notes)
    plot_html = "".join(_img(k, plots[k]) for k in ("accuracy.png", "epsilon.png") if k in plots)
    prior_html = ""
    if "prior_images.png" in plots:
        prior_html = ("<h2>The prior's training images (synthetic, no private data)</h2>"
                      f"<div class=wide>{_img('prior_images.png', plots['prior_images.png'])}</div>")
    if s.get("search_epsilon") is None:
        claim = (f"The released model satisfies ({s['epsilon']:.3f}, {s['delta']:g})-differential privacy "
                 f"with respect to the {s['num_train']} training images (add/remove one image), by the "
                 f"{s['accountant'].upper()} accountant composing every step in <code>ledger.jsonl</code> "
                 "(Poisson sampling, Gaussian noise, per-sample clipping). The number of training images "
                 "(which sets q and the noise), the classes and the train/validation split are treated as public, "
                 "as in other DP-SGD libraries.")
    else:
        claim = (f"This run is a candidate of a private hyperparameter search (dprandp tune). If the search "
                 f"selects it, the <code>model.pt</code> it writes next to <code>tuning.json</code> satisfies "
                 f"({s['search_epsilon']:.3f}, {s['delta']:g})-differential privacy with the search included (RDP "
                 "repeat-and-select bound), with respect to the training and validation images for the fixed "
                 f"split (add/remove one image of either). Its own steps in <code>ledger.jsonl</code> give "
                 f"ε = {s['epsilon']:.3f}; that is no guarantee for a selected model, and a run from a search "
                 "that did not finish has none to claim.")
    guarantee = (f"{claim} The guarantee covers the model, "
                 "not this report: the train-batch curve and <code>metrics.jsonl</code> (train loss and "
                 "accuracy, batch sizes, gradient norms, clipped fraction) are computed from private batches "
                 "without noise, and the test and validation scores from private held-out data. Keep them "
                 "private, or publish only the model and ε.")
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8>
<meta name=viewport content="width=device-width,initial-scale=1">
<title>dprandp run report: {e(s['dataset'])}</title><style>{_CSS}</style></head><body><main>
<h1>DP-RandP run: {e(s['dataset'])}</h1>
<p class=sub>Differentially private training with a prior learned from random processes · {e(s.get('finished', ''))}</p>
<div class=cards>{card_html}</div>
<div class=ok>{guarantee}</div>
{note_html}
<h2>Curves</h2><div class=plots>{plot_html}</div>
{prior_html}
<h2>Run</h2><table>{info}</table>
<h2>Privacy ledger</h2>
<p>Consecutive ledger records with equal sampling rate and noise, as composed by the accountant.</p>
<table><tr><th>#</th><th>steps</th><th>sample rate q</th><th>noise multiplier σ</th></tr>{phase_rows}</table>
<h2>Configuration</h2><div class=cfg>{cfg_tables}</div>
<footer>Generated by dprandp {e(s['code_version'])}. Test accuracy is that of the {e(s.get('reported_model', 'final EMA model'))}
(never the best over steps). Files: config.json, ledger.jsonl, metrics.jsonl, model.pt, summary.json.</footer>
</main></body></html>
"""


def json_value(v) -> str:
    import json

    return json.dumps(v)


def write_report(run_dir: Path, *, summary: dict, config: dict, metrics: list[dict],
                 ledger_phases: list[dict], notes: list[str],
                 prior_images: np.ndarray | None = None) -> Path:
    """Write the PNG plots and ``report.html`` into ``run_dir``; returns the report's path."""
    plots = make_plots(metrics, target_epsilon=summary["target_epsilon"],
                       phase2_steps=summary["phase2_steps_done"], prior_images=prior_images,
                       ema=config.get("ema", True))
    for name, data in plots.items():
        atomic_write_bytes(run_dir / name, data)
    path = run_dir / "report.html"
    atomic_write_bytes(path, render_html(summary, config, ledger_phases, plots, notes).encode())
    return path
