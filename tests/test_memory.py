"""The up-front memory check: a lower bound on one physical chunk's memory, never above the real peak,
and a one-line refusal (before anything is written or pretrained) when the bound exceeds the free memory.

Found in review: ``--augmult`` in the thousands was killed by the kernel's OOM killer (exit 137, no
message) after the run directory was written, and for ``dprandp run`` after Phase I."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz
from torch import nn

from dprandp.errors import InputError
from dprandp.pipeline import memory as pm
from dprandp.pipeline import preset
from dprandp.privacy.memory import chunk_bytes_lower_bound, host_available_bytes, saved_bytes_per_view


def test_saved_bytes_per_view_counts_each_saved_activation_once():
    """Conv saves its input (3 x 8 x 8 floats); ReLU its output (4 x 8 x 8), which Flatten views and
    Linear saves again (one storage, counted once); the logits' log-softmax saves 5 floats."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))
    expected = 4 * (3 * 64 + 4 * 64 + 5)
    assert saved_bytes_per_view(model, (3, 8, 8)) == pytest.approx(expected, abs=16)
    for p in model[0].parameters():  # a frozen first layer needs no saved input
        p.requires_grad_(False)
    assert saved_bytes_per_view(model, (3, 8, 8)) == pytest.approx(4 * (4 * 64 + 5), abs=16)
    assert model.training


def test_bf16_autocast_halves_the_saved_activations():
    from dprandp.models import create_model

    model = create_model("wrn-10-1", num_classes=10, seed=0)
    fp32 = saved_bytes_per_view(model, (3, 32, 32))
    bf16 = saved_bytes_per_view(model, (3, 32, 32), precision="bf16")
    assert 0.4 * fp32 < bf16 < 0.8 * fp32


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
@pytest.mark.parametrize("method", ["layerwise", "vmap"])
def test_the_bound_never_exceeds_the_measured_peak_of_a_real_chunk(method):
    """The bound must be a lower bound, or the check would refuse runs that fit. Measured in a fresh
    process (no reused heap): the peak RSS of one clipped chunk over the RSS before it."""
    script = textwrap.dedent(f"""
        import torch
        from dprandp.models import create_model
        from dprandp.privacy.clipping import clip_and_sum
        from dprandp.privacy.memory import chunk_bytes_lower_bound, saved_bytes_per_view
        torch.set_num_threads(1)
        def rss(key):
            return 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
        m = create_model("wrn-10-1", head_pool=4, num_classes=10, seed=0)
        p, k = 48, 2
        x, y = torch.rand(p, k, 3, 32, 32), torch.zeros(p, dtype=torch.long)
        clip_and_sum(m, x[:1], y[:1], max_grad_norm=1.0, method="{method}")
        bound = chunk_bytes_lower_bound(saved_bytes_per_view(m, (3, 32, 32)), (3, 32, 32),
                                        physical_batch_size=p, augmult=k) - x.numel() * 4  # x exists already
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS")
        clip_and_sum(m, x, y, max_grad_norm=1.0, method="{method}")
        print(bound, rss("VmHWM") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    bound, peak = map(int, out.split())
    assert bound > 50e6  # a bound worth checking (48 x 2 views of WRN-10-1)
    assert bound <= peak, (bound, peak)


def test_chunk_bound_is_views_times_their_bytes():
    assert chunk_bytes_lower_bound(1000, (3, 4, 4), physical_batch_size=5, augmult=3) == 15 * (1000 + 4 * 48)


def test_host_memory_is_read_on_linux():
    free = host_available_bytes()
    if Path("/proc/meminfo").exists():
        assert free is not None and free > 0


def _config(tmp_path, **kw):
    base = dict(dataset="npz", data=tiny_npz(tmp_path / "t.npz"), model="wrn-10-1", prior=None, batch_size=16,
                augmult=2, physical_batch_size=16, steps=4, phase2_steps=0, noise_multiplier=3.0,
                target_epsilon=50.0, eval_every=0)
    base.update(kw)
    return preset("demo", **base)


def test_the_check_refuses_warns_or_passes_against_the_free_memory(tmp_path, monkeypatch):
    config = _config(tmp_path)
    kw = dict(num_classes=10, view_shape=(3, 32, 32), device=torch.device("cpu"))
    need = 16 * chunk_bytes_lower_bound(saved_bytes_per_view(_model(config), (3, 32, 32)), (3, 32, 32),
                                        physical_batch_size=1, augmult=2)
    logged = []
    monkeypatch.setattr(pm, "available_bytes", lambda device: need - 1)
    # need - 1 bytes: refused; the largest chunk to try leaves room for the layer-wise peak factor (4): 16 // 4 - 1
    with pytest.raises(InputError, match=r"physical chunk of 16 samples x 2 views needs at least .* "
                                         r"lower --physical-batch-size to 3 or less"):
        pm.check_chunk_fits(config, **kw, log=logged.append)
    monkeypatch.setattr(pm, "available_bytes", lambda device: need * 2)
    pm.check_chunk_fits(config, **kw, log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("warning:") and "may run out of memory" in logged[0]
    monkeypatch.setattr(pm, "available_bytes", lambda device: need * 4)  # the layer-wise peak factor: no warning
    pm.check_chunk_fits(config, **kw, log=logged.append)
    assert len(logged) == 1
    # Two ranks split the batch (8 samples each); an unknown free memory checks nothing.
    monkeypatch.setattr(pm, "available_bytes", lambda device: need // 2 + 1)
    pm.check_chunk_fits(config, **kw, world_size=2)
    monkeypatch.setattr(pm, "available_bytes", lambda device: None)
    pm.check_chunk_fits(config.replace(augmult=10**6), **kw)


def _model(config):
    from dprandp.models import create_model

    return create_model(config.model, head_pool=config.head_pool, num_classes=10, seed=0)


def test_phase_two_on_cached_features_needs_no_view_memory(tmp_path, monkeypatch):
    config = _config(tmp_path, prior="p.pt", phase2_steps=4, steps=4, phase2_features="cached", augmult=10**6)
    monkeypatch.setattr(pm, "available_bytes", lambda device: 1)
    pm.check_chunk_fits(config, num_classes=10, view_shape=(3, 32, 32), device=torch.device("cpu"))
    with pytest.raises(InputError, match="one sample's 1000000 views do not fit: lower --augmult"):
        pm.check_chunk_fits(config.replace(phase2_features="augmented"), num_classes=10, view_shape=(3, 32, 32),
                            device=torch.device("cpu"))


@pytest.mark.parametrize("command", ["train", "run"])
def test_the_cli_refuses_a_chunk_that_cannot_fit_before_writing_or_pretraining(tmp_path, command):
    """10^5 views of one sample need ~100 GB per sample: any machine refuses, in one line, and the
    run directory (and for `run`, Phase I's cache) is never created."""
    data = tiny_npz(tmp_path / "t.npz")
    args = ["--preset", "demo", "--dataset", "npz", "--data", data, "--model", "wrn-10-1", "--batch-size", "16",
            "--augmult", "100000", "--out", str(tmp_path / "out"), "--threads", "1"]
    args += ["--prior", make_prior(tmp_path / "p.pt")] if command == "train" else []
    env = {**__import__("os").environ, "DPRANDP_CACHE": str(tmp_path / "cache")}
    got = subprocess.run([sys.executable, "-m", "dprandp", command, *args], capture_output=True, text=True, env=env)
    assert got.returncode == 2, got.stderr
    assert got.stderr.count("\n") == 1 and "dprandp: error: a physical chunk of" in got.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
