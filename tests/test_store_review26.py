"""Found in review 26: a stale ``STORE.npy.json`` was trusted for an array replaced by other means (a prior then
claimed another process and seed), and an interrupted ``dprandp generate`` left a hidden temporary store behind
(SIGTERM) or told the user to ``train --resume`` (Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dprandp.cli.main import main
from dprandp.pretrain import PretrainConfig, load_prior, open_store, pretrain
from dprandp.processes import get_process
from dprandp.processes import store as store_module
from dprandp.processes.store import TERMINATED, GenerateRequest, content_fingerprint, generate, sidecar_path


def _generate(out, *, process="dead-leaves-squares", num=12, size=16, seed=5, **kw):
    generate(GenerateRequest(process=process, num=num, size=size, seed=seed, out=out, **kw), progress=False)


# ---- the sidecar is checked against the array ---------------------------------------------------------------------

def test_generate_records_shape_dtype_and_fingerprint_and_open_store_trusts_a_matching_sidecar(tmp_path):
    out = tmp_path / "s.npy"
    _generate(out)
    meta = json.loads(sidecar_path(out).read_text())
    array = np.load(out, mmap_mode="r")
    assert meta["shape"] == [12, 16, 16, 3] and meta["dtype"] == "uint8"
    assert meta["content_sha256"] == content_fingerprint(array)
    described = open_store(out).describe()
    assert described["store_meta"] == meta and "store_meta_ignored" not in described


def test_a_sidecar_left_beside_an_array_of_another_shape_is_ignored(tmp_path):
    """The reviewer's case: 130 x 32 px stylegan images generated, then 40 dead-leaves images at 16 px saved over."""
    out = tmp_path / "a.npy"
    _generate(out, num=12, size=16, seed=5)
    np.save(out, get_process("dead-leaves-shapes").render(np.arange(8), seed=0, size=16))
    described = open_store(out).describe()
    assert "store_meta" not in described
    assert "num_images 12" in described["store_meta_ignored"] and "a.npy.json" in described["store_meta_ignored"]


def test_a_sidecar_left_beside_an_array_rewritten_with_the_same_shape_is_ignored(tmp_path):
    out = tmp_path / "a.npy"
    _generate(out, seed=5)
    np.save(out, get_process("dead-leaves-squares").render(np.arange(12), seed=6, size=16))  # same shape, other seed
    described = open_store(out).describe()
    assert "store_meta" not in described and "other image contents" in described["store_meta_ignored"]


@pytest.mark.parametrize("sidecar, trusted", [
    ({"process": "blobs", "num_images": 10, "size": 16, "seed": 1}, True),  # before shape/fingerprint were recorded
    ({"process": "blobs", "num_images": 11, "size": 16, "seed": 1}, False),
    ({"process": "blobs", "num_images": 10, "size": 32, "seed": 1}, False),
    ({"process": "blobs", "seed": 1}, True),  # records nothing to check: taken at its word, as before
    (["blobs", 1], False),  # not an object: it would break whoever reads store_meta.get(...)
])
def test_an_old_or_hand_written_sidecar_counts_when_what_it_records_matches(tmp_path, sidecar, trusted):
    np.save(tmp_path / "s.npy", np.zeros((10, 16, 16, 3), np.uint8))
    (tmp_path / "s.npy.json").write_text(json.dumps(sidecar))
    described = open_store(tmp_path / "s.npy").describe()
    assert ("store_meta" in described) == trusted and ("store_meta_ignored" in described) != trusted


def test_a_store_without_sidecar_still_opens(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros((10, 16, 16, 3), np.uint8))
    described = open_store(tmp_path / "s.npy").describe()
    assert described["shape"] == [10, 16, 16, 3]
    assert "store_meta" not in described and "store_meta_ignored" not in described


def test_a_prior_on_a_replaced_store_does_not_claim_the_stale_sidecars_process_and_seed(tmp_path):
    out = tmp_path / "a.npy"
    _generate(out, process="dead-leaves-squares", num=12, size=16, seed=5)
    np.save(out, get_process("dead-leaves-shapes").render(np.arange(32), seed=0, size=16))
    config = PretrainConfig(model="wrn-10-1", hidden=32, out_dim=16, head_groups=8, batch_size=16, lr_per_256=0.5,
                            epochs=1, seed=0)
    pretrain(config, open_store(out), out=tmp_path / "p.pt", progress=False)
    meta = load_prior(tmp_path / "p.pt")[1]
    provenance = meta["provenance"]
    assert provenance["process"] is None and provenance["process_seed"] is None
    assert meta["pretrain_config"]["process"] is None
    assert "ignored" in provenance["source"]["store_meta_ignored"]  # the prior says why


# ---- interrupting generate ---------------------------------------------------------------------------------------

def _render_then(action):
    """A renderer that renders the first chunk and then runs ``action`` (an interrupt) on the second."""
    calls = []
    real = store_module._render_chunk

    def render(task):
        calls.append(task)
        if len(calls) == 2:
            action()
        return real(task)
    return render


def _ctrl_c():
    raise KeyboardInterrupt


def test_sigterm_during_generate_raises_system_exit_removes_the_temporary_store_and_restores_the_handler(
        tmp_path, monkeypatch):
    caught = []

    def ours(signum, frame):  # stands in for the default action, which would end pytest
        caught.append(signum)
        raise RuntimeError("SIGTERM reached the caller's handler")

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        monkeypatch.setattr(store_module, "_render_chunk", _render_then(lambda: os.kill(os.getpid(), signal.SIGTERM)))
        with pytest.raises(SystemExit) as exc:
            _generate(tmp_path / "c.npy", num=200)
        assert exc.value.code == TERMINATED == 143 and not caught
        assert signal.getsignal(signal.SIGTERM) is ours  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_overwrite_keeps_the_old_store_and_its_sidecar(tmp_path, monkeypatch):
    out = tmp_path / "c.npy"
    _generate(out, num=12, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(store_module, "_render_chunk", _render_then(_ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        _generate(out, num=200, seed=2, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_ctrl_c_on_generate_says_nothing_was_written_not_train_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store_module, "_render_chunk", _render_then(_ctrl_c))
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--process", "dead-leaves-squares", "--num", "200", "--size", "16",
              "--out", str(tmp_path / "c.npy"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 130 and len(lines) == 1, err
    assert lines[0].startswith("dprandp: error: interrupted; nothing was written to") and "resume" not in lines[0]
    assert list(tmp_path.iterdir()) == []


def _start_and_wait_for_the_temporary_store(tmp_path, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "dprandp", "generate", "--num", "100000", "--size", "32", "--out",
                             "c.npy", "--no-progress", *extra], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    start = time.time()
    while not list(tmp_path.glob(".c.npy.*.tmp.npy")):
        assert proc.poll() is None and time.time() - start < 120, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.5)  # rendering, with the temporary store open
    return proc


def test_sigterm_on_the_cli_leaves_no_temporary_store(tmp_path):
    """What `timeout` and batch schedulers send: the hidden temp store used to stay, loadable as a store of zeros."""
    proc = _start_and_wait_for_the_temporary_store(tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == TERMINATED and len(lines) == 1 and "terminated" in lines[0], err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_to_the_process_group_with_workers_is_one_line_and_leaves_nothing(tmp_path):
    """A terminal's Ctrl-C reaches every worker too: they leave the interrupt to the parent (no traceback each)."""
    proc = _start_and_wait_for_the_temporary_store(tmp_path, "--workers", "2")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "nothing was written to c.npy" in lines[0], err[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_pretrain_cli_says_when_it_ignores_a_stale_sidecar(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "a.npy"
    _generate(out, process="dead-leaves-squares", num=12, size=16, seed=5)
    np.save(out, get_process("dead-leaves-shapes").render(np.arange(32), seed=0, size=16))
    got = subprocess.run([sys.executable, "-m", "dprandp", "pretrain", "--images", str(out), "--model", "wrn-10-1",
                          "--hidden", "16", "--batch-size", "8", "--epochs", "1", "--threads", "1", "--precision", "fp32",
                          "--out", str(tmp_path / "p.pt"), "--no-progress"], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert "note: " in got.stderr and "ignored" in got.stderr and "process is unknown" in got.stderr
