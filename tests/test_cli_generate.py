"""``dprandp generate``: the store, worker-count independence, and one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest

from dprandp.cli.main import main
from dprandp.errors import InputError
from dprandp.processes import get_process, list_processes
from dprandp.processes.store import GenerateRequest, check_request

Result = namedtuple("Result", "code out err")


def run(capsys, *args) -> Result:
    try:
        main(["generate", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def test_list_names_every_process(capsys):
    r = run(capsys, "--list")
    assert r.code == 0
    lines = r.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_processes()


def test_store_is_the_rendered_images_and_workers_do_not_change_bytes(tmp_path, capsys):
    a, b, grid = tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "grid.png"
    args = ["--process", "stylegan-oriented", "--num", 70, "--size", 16, "--seed", 9, "--no-progress"]
    assert run(capsys, *args, "--out", a, "--grid", grid).code == 0
    assert run(capsys, *args, "--out", b, "--workers", 2).code == 0
    assert a.read_bytes() == b.read_bytes()
    store = np.load(a, mmap_mode="r")
    assert store.shape == (70, 16, 16, 3) and store.dtype == np.uint8
    expected = get_process("stylegan-oriented").render([0, 1, 65, 69], seed=9, size=16)
    np.testing.assert_array_equal(store[[0, 1, 65, 69]], expected)
    from PIL import Image

    assert Image.open(grid).size == (8 * 18 - 2, 8 * 18 - 2)  # 8 x 8 images, 2 px gaps
    # no temp file left; each store has its description sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.npy.json", "b.npy", "b.npy.json", "grid.png"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "x.npy"
    out.write_bytes(b"keep me")
    r = run(capsys, "--process", "dead-leaves-squares", "--num", 3, "--size", 16, "--out", out)
    assert r.code == 2 and "already exists" in r.err and "--overwrite" in r.err
    assert out.read_bytes() == b"keep me"
    r = run(capsys, "--process", "dead-leaves-squares", "--num", 3, "--size", 16, "--out", out, "--overwrite")
    assert r.code == 0 and np.load(out).shape == (3, 16, 16, 3)


@pytest.mark.parametrize("args, fragment", [
    (["--process", "nope", "--num", 3], "stylegan-oriented, stylegan-oriented-n512, stylegan-highfreq"),
    (["--num", 0], "--num"),
    (["--num", -5], "--num"),
    (["--num", 3, "--size", 48], "size 48"),
    (["--num", 3, "--size", 4], "size 4"),
    (["--num", 3, "--seed", -1], "--seed"),
    (["--num", 3, "--workers", 0], "--workers"),
    (["--num", "ten"], "ten"),
    ([], "--num is required"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    r = run(capsys, *args, "--out", tmp_path / "x.npy")
    assert r.code == 2
    assert r.err.startswith("dprandp: error:") and r.err.count("\n") == 1 and fragment in r.err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bad_paths(tmp_path, capsys):
    r = run(capsys, "--num", 3, "--out", tmp_path / "missing" / "x.npy")
    assert r.code == 2 and "does not exist" in r.err
    r = run(capsys, "--num", 3, "--out", tmp_path / "x.bin")
    assert r.code == 2 and ".npy" in r.err
    (tmp_path / "d.npy").mkdir()
    r = run(capsys, "--num", 3, "--out", tmp_path / "d.npy")
    assert r.code == 2 and "directory" in r.err
    r = run(capsys, "--num", 3, "--out", tmp_path / "x.npy", "--grid", tmp_path / "nodir" / "g.png")
    assert r.code == 2 and "grid" in r.err


def test_unwritable_directory_refused(tmp_path, monkeypatch):
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    req = GenerateRequest(process="spectrum", num=2, size=16, seed=0, out=tmp_path / "x.npy")
    with pytest.raises(InputError, match="not writable"):
        check_request(req)


def test_not_enough_disk_refused_before_work(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    req = GenerateRequest(process="stylegan-oriented", num=105_000, size=64, seed=0, out=tmp_path / "x.npy")
    with pytest.raises(InputError, match=r"needs 1\.29 GB"):
        check_request(req)


def test_real_entry_point(tmp_path):
    out = tmp_path / "s.npy"
    r = subprocess.run([sys.executable, "-m", "dprandp", "generate", "--process", "spectrum", "--num", "4",
                        "--size", "16", "--out", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"images_per_s"' in r.stdout and np.load(out).shape == (4, 16, 16, 3)



def test_store_has_a_sidecar_that_pretrain_reads(tmp_path):
    from dprandp.pretrain.data import open_store
    from dprandp.processes.store import GenerateRequest, generate, sidecar_path

    out = tmp_path / "s.npy"
    generate(GenerateRequest(process="dead-leaves-squares", num=3, size=16, seed=7, out=out), progress=False)
    assert sidecar_path(out).exists()
    meta = open_store(out).description["store_meta"]
    assert meta["process"] == "dead-leaves-squares" and meta["seed"] == 7 and meta["num_images"] == 3
