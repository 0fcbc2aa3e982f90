"""Phase I training: the loss goes down, priors round-trip, resume equals an uninterrupted run, bad input fails cleanly."""

import numpy as np
import pytest
import torch

from dprandp.cli.main import main
from dprandp.errors import InputError
from dprandp.models import create_model
from dprandp.pretrain import ArrayStore, ContrastiveModel, PretrainConfig, apply_prior, load_prior, pretrain, two_views
from dprandp.pretrain.checkpoint import state_path
from dprandp.pretrain.loss import align_uniform_loss



TINY = dict(model="wrn-10-1", hidden=32, out_dim=16, head_groups=8, batch_size=16, lr_per_256=0.5)


def _images(n=48, size=24, seed=0):
    """Smooth random colour blobs (low-pass noise): structured enough for views to share content."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 4, 4, 3))
    x = torch.nn.functional.interpolate(torch.tensor(coarse).permute(0, 3, 1, 2), size=size, mode="bicubic")
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def _fixed_batch_loss(model, images, seed=123):
    v1, v2 = two_views(images, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    return float(align_uniform_loss(z1, z2))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_few_steps_lower_the_loss(tmp_path, precision):
    images = _images(32)
    # one full-store batch per step, 12 steps, constant lr; the loss is measured on 3 fixed sets of views
    config = PretrainConfig(**{**TINY, "lr_per_256": 0.4, "batch_size": 32}, epochs=12, milestones=(1.0,), seed=0)
    before = np.mean([_fixed_batch_loss(ContrastiveModel(config).eval(), images, seed=s) for s in range(3)])
    pretrain(config, ArrayStore(images), out=tmp_path / "p.pt", progress=False, keep_state=True, precision=precision)
    trunk, meta = load_prior(tmp_path / "p.pt")
    assert meta["provenance"]["precision"] == precision
    assert all(v.dtype == torch.float32 for v in trunk.values() if v.is_floating_point())  # bf16 only inside autocast
    model = ContrastiveModel(config)
    model.load_state_dict(torch.load(state_path(tmp_path / "p.pt"), weights_only=True)["model"])
    after = np.mean([_fixed_batch_loss(model.eval(), images, seed=s) for s in range(3)])
    # the drop is chaotic in float rounding (thread count, view arithmetic): 0.09-0.54 over six seeds
    # and both precisions; a trainer that does not learn leaves it at exactly 0
    assert after < before - 0.05, (before, after)


def test_save_load_apply_gives_identical_outputs(tmp_path):
    config = PretrainConfig(**TINY, epochs=1, seed=1)
    pretrain(config, ArrayStore(_images(32)), out=tmp_path / "p.pt", progress=False, keep_state=True)
    trained = ContrastiveModel(config)
    trained.load_state_dict(torch.load(state_path(tmp_path / "p.pt"), weights_only=True)["model"])
    trunk, meta = load_prior(tmp_path / "p.pt")
    assert meta["model"] == "wrn-10-1" and meta["provenance"]["epochs_done"] == 1
    assert meta["provenance"]["num_images"] == 32 and meta["provenance"]["seed"] == 1
    assert meta["provenance"]["code_version"] and meta["provenance"]["date"]
    classifier = create_model("wrn-10-1", num_classes=3, seed=99)
    lacking = apply_prior(classifier, tmp_path / "p.pt")
    assert lacking and all(n.startswith(("final_norm.", "head.")) for n in lacking)
    assert set(lacking) == {n for n, _ in classifier.named_parameters() if not n.startswith("trunk.")}
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(classifier.trunk(x), trained.trunk(x))
    # the in-memory form works the same way, and a different architecture is refused
    apply_prior(create_model("wrn-10-1", seed=5), (trunk, meta))
    with pytest.raises(InputError, match="another architecture"):
        apply_prior(create_model("wrn-16-1", seed=0), tmp_path / "p.pt")


def test_resume_equals_uninterrupted(tmp_path):
    images = ArrayStore(_images(40))
    config = PretrainConfig(**TINY, epochs=3, seed=2)  # lr drops at epoch 2 and 3: the scheduler state matters
    full = pretrain(config, images, out=tmp_path / "a.pt", progress=False)
    part = pretrain(config, images, out=tmp_path / "b.pt", progress=False, stop_after_epoch=1)
    assert part.epochs_done == 1 and state_path(tmp_path / "b.pt").exists()
    with pytest.raises(InputError, match="already exists"):
        pretrain(config, images, out=tmp_path / "b.pt", progress=False)
    rest = pretrain(config, images, out=tmp_path / "b.pt", progress=False, resume=True)
    assert rest.epochs_done == 3 and not state_path(tmp_path / "b.pt").exists()
    a, _ = load_prior(tmp_path / "a.pt")
    b, meta = load_prior(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["provenance"]["epoch_losses"] == pytest.approx(full.epoch_losses, rel=0, abs=0)
    # resuming with another architecture or other settings is refused
    pretrain(config, images, out=tmp_path / "c.pt", progress=False, stop_after_epoch=1)
    other = PretrainConfig(**{**TINY, "model": "wrn-16-1"}, epochs=3, seed=2)
    with pytest.raises(InputError, match="another architecture"):
        pretrain(other, images, out=tmp_path / "c.pt", progress=False, resume=True)
    with pytest.raises(InputError, match="different settings"):
        pretrain(PretrainConfig(**TINY, epochs=3, seed=3), images, out=tmp_path / "c.pt", progress=False, resume=True)


def test_resume_on_other_images_is_refused(tmp_path):
    """Same shape, same settings, other pictures: the state names the store it was trained on."""
    from dprandp.pretrain import open_store

    np.save(tmp_path / "one.npy", _images(40, seed=0))
    np.save(tmp_path / "two.npy", _images(40, seed=1))
    config = PretrainConfig(**TINY, epochs=2, seed=2)
    pretrain(config, open_store(tmp_path / "one.npy"), out=tmp_path / "p.pt", progress=False, stop_after_epoch=1)
    with pytest.raises(InputError, match="was trained on other images"):
        pretrain(config, open_store(tmp_path / "two.npy"), out=tmp_path / "p.pt", progress=False, resume=True)
    done = pretrain(config, open_store(tmp_path / "one.npy"), out=tmp_path / "p.pt", progress=False, resume=True)
    assert done.epochs_done == 2


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def _cli(capsys):
    """Run `dprandp pretrain ...` in-process (the real entry point, exit status and streams)."""

    def run(*args):
        capsys.readouterr()
        try:
            main(["pretrain", "--threads", "1", "--no-progress", *args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out, err = capsys.readouterr()
        return _Result(code, out, err)

    return run


@pytest.mark.parametrize("kind", ["missing", "float", "3d", "pickle", "text", "small"])
def test_cli_bad_store_is_one_line_exit_2(tmp_path, kind, _cli):
    path = tmp_path / "store.npy"
    if kind == "float":
        np.save(path, np.zeros((4, 16, 16, 3), dtype=np.float32))
    elif kind == "3d":
        np.save(path, np.zeros((4, 16, 16), dtype=np.uint8))
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("not an array")
    elif kind == "small":  # batch larger than the store
        np.save(path, np.zeros((4, 16, 16, 3), dtype=np.uint8))
    r = _cli("--images", str(path), "--out", str(tmp_path / "p.pt"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("dprandp: error:"), r.stderr
    assert not (tmp_path / "p.pt").exists()


def test_cli_trains_and_refuses_overwrite_and_foreign_resume(tmp_path, _cli):
    store = tmp_path / "s.npy"
    np.save(store, _images(32))
    (tmp_path / "s.json").write_text('{"process": "blobs", "seed": 7}')  # a generator's sidecar metadata
    out = tmp_path / "p.pt"
    flags = ["--images", str(store), "--model", "wrn-10-1", "--hidden", "32", "--batch-size", "16", "--epochs", "1",
             "--preset", "cpu", "--out", str(out)]
    r = _cli(*flags)
    assert r.returncode == 0, r.stderr
    assert '"epochs_done": 1' in r.stdout and out.exists()
    provenance = load_prior(out)[1]["provenance"]
    assert provenance["process"] == "blobs" and provenance["process_seed"] == 7 and provenance["num_images"] == 32
    r = _cli(*flags)
    assert r.returncode == 2 and "already exists" in r.stderr and r.stderr.count("\n") == 1
    # a prior from another architecture is not resumable
    r = _cli(*[f if f != "wrn-10-1" else "wrn-16-1" for f in flags], "--resume")
    assert r.returncode == 2 and "another architecture" in r.stderr and r.stderr.count("\n") == 1
    r = _cli("--out", str(out))
    assert r.returncode == 2 and "exactly one of" in r.stderr


def test_cli_process_on_the_fly_and_unknown_process(tmp_path, _cli):
    processes = pytest.importorskip("dprandp.processes")
    if not hasattr(processes, "list_processes"):
        pytest.skip("random-process generators not available")
    out = tmp_path / "p.pt"
    r = _cli("--process", "stylegan-oriented", "--num", "32", "--size", "32", "--model", "wrn-10-1", "--hidden", "32",
             "--batch-size", "16", "--epochs", "1", "--preset", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    provenance = load_prior(out)[1]["provenance"]
    assert provenance["process"] == "stylegan-oriented" and provenance["num_images"] == 32
    assert provenance["image_size"] == 32 and provenance["process_seed"] == 0
    r = _cli("--process", "no-such-noise", "--num", "32", "--out", str(tmp_path / "q.pt"))
    assert r.returncode == 2 and "unknown random process" in r.stderr and r.stderr.count("\n") == 1
    r = _cli("--process", "stylegan-oriented", "--out", str(tmp_path / "q.pt"))
    assert r.returncode == 2 and "--num" in r.stderr


def test_precision_auto_uses_bf16_only_where_native(monkeypatch):
    from dprandp.pretrain import precision as prec

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prec.resolve_precision("fp32", cuda) == "fp32" and prec.resolve_precision("bf16", cpu) == "bf16"
    assert prec.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    assert prec.resolve_precision("auto", cpu) == "fp32"  # emulated bf16 is slower than float32
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(InputError, match="precision must be one of"):
        prec.resolve_precision("fp16", cpu)


def test_one_epoch_of_one_step_equals_a_hand_computed_sgd_step(tmp_path):
    """The loop's data order, views, loss and SGD update against an independent re-computation.

    One epoch of one full batch: the prior must equal w - lr * (grad + weight_decay * w), where the
    gradient is taken by autograd of the align-uniform loss on views drawn from the same seeded
    generators (the momentum buffer is the gradient itself on the first step).
    """
    from dprandp.pretrain.trainer import make_generators
    from dprandp.pretrain.views import ViewConfig

    images = _images(16)
    config = PretrainConfig(**TINY, epochs=1, seed=4)
    pretrain(config, ArrayStore(images), out=tmp_path / "p.pt", progress=False, precision="fp32")
    trunk, _ = load_prior(tmp_path / "p.pt")

    data_gen, aug_gen = make_generators(config.seed)
    order = torch.randperm(16, generator=data_gen).numpy()
    v1, v2 = two_views(images[order], aug_gen, ViewConfig(size=config.crop_size))
    model = ContrastiveModel(config)
    z1, z2 = model(torch.cat([v1, v2])).chunk(2)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(align_uniform_loss(z1, z2), list(params.values()))))
    for name, w in trunk.items():
        if f"trunk.{name}" in params:
            p = params[f"trunk.{name}"]
            expected = p.detach() - config.lr * (grads[f"trunk.{name}"] + config.weight_decay * p.detach())
            torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
        else:  # buffers: unchanged by SGD
            torch.testing.assert_close(w, model.state_dict()[f"trunk.{name}"])


@pytest.mark.parametrize("load, threads, want_threads, want_note", [
    (5.0, None, 1, True),  # busy machine, no --threads: one thread, said once on stderr
    (0.1, None, None, False),  # idle: torch's own choice is left alone
    (5.0, 2, 2, False),  # an explicit --threads always wins
])
def test_cli_threads_default_to_one_on_a_busy_machine(tmp_path, monkeypatch, capsys, load, threads, want_threads,
                                                       want_note):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    store = tmp_path / "s.npy"
    np.save(store, _images(32))
    args = ["pretrain", "--no-progress", "--images", str(store), "--model", "wrn-10-1", "--hidden", "32",
            "--batch-size", "16", "--epochs", "1", "--preset", "cpu", "--out", str(tmp_path / "p.pt")]
    try:
        torch.set_num_threads(3)
        try:
            main(args + (["--threads", str(threads)] if threads else []))
        except SystemExit as exc:
            assert not exc.code, capsys.readouterr().err
        seen = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == (want_threads or 3)
    assert ("the machine is busy" in capsys.readouterr().err) == want_note


@pytest.mark.parametrize("existing", ["prior", "state"])
def test_cli_refuses_an_existing_out_before_rendering_any_image(tmp_path, monkeypatch, _cli, existing):
    """Rendering 36k images takes minutes: an --out that would be refused must be refused first."""
    import dprandp.pretrain as pretrain_api

    out = tmp_path / "p.pt"
    (state_path(out) if existing == "state" else out).write_bytes(b"earlier work")
    rendered = []
    monkeypatch.setattr(pretrain_api, "process_source", lambda *a, **k: rendered.append(a) or pytest.fail("rendered"))
    r = _cli("--process", "stylegan-oriented", "--num", "32", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not rendered
    assert (state_path(out) if existing == "state" else out).read_bytes() == b"earlier work"
    blocked = tmp_path / "file"
    blocked.write_text("x")
    r = _cli("--process", "stylegan-oriented", "--num", "32", "--out", str(blocked / "p.pt"))
    assert r.returncode == 2 and "not a directory" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not rendered


def test_resuming_a_complete_prior_checks_its_settings_and_images(tmp_path):
    """Found in review: with the state gone (a finished run) --resume accepted any settings and images,
    and reported the new settings as the prior's."""
    from dataclasses import replace

    from dprandp.pretrain import open_store

    np.save(tmp_path / "one.npy", _images(32, seed=0))
    np.save(tmp_path / "two.npy", _images(32, seed=1))
    config = PretrainConfig(**TINY, epochs=1, seed=2)
    pretrain(config, open_store(tmp_path / "one.npy"), out=tmp_path / "p.pt", progress=False)
    assert not state_path(tmp_path / "p.pt").exists()
    with pytest.raises(InputError, match=r"complete but was made with different settings: hidden=32 \(now 64\)"):
        pretrain(replace(config, hidden=64), open_store(tmp_path / "one.npy"), out=tmp_path / "p.pt", progress=False,
                 resume=True)
    with pytest.raises(InputError, match="complete but was trained on other images"):
        pretrain(config, open_store(tmp_path / "two.npy"), out=tmp_path / "p.pt", progress=False, resume=True)
    again = pretrain(config, open_store(tmp_path / "one.npy"), out=tmp_path / "p.pt", progress=False, resume=True)
    assert again.epochs_done == 1 and again.config.hidden == 32 and again.config.num_images == 32


def test_a_store_run_records_the_store_process_and_previews_the_store_images(tmp_path):
    """Found in review: an --images run recorded the preset's process in its config, and the run report
    re-rendered the preview with the training seed instead of the images' seed."""
    from dprandp.pipeline.finish import prior_preview
    from dprandp.pretrain import open_store
    from dprandp.processes import get_process
    from dprandp.processes.store import GenerateRequest, generate

    store = tmp_path / "s.npy"
    generate(GenerateRequest(process="dead-leaves-shapes", num=32, size=16, seed=5, out=store), progress=False)
    pretrain(PretrainConfig(**TINY, epochs=1, seed=0), open_store(store), out=tmp_path / "p.pt", progress=False)
    meta = load_prior(tmp_path / "p.pt")[1]
    assert meta["pretrain_config"]["process"] == meta["provenance"]["process"] == "dead-leaves-shapes"
    preview = prior_preview(str(tmp_path / "p.pt"), n=4)
    np.testing.assert_array_equal(preview, np.load(store)[:4])
    assert not np.array_equal(preview, get_process("dead-leaves-shapes").render(np.arange(4), seed=0, size=16))
    np.save(tmp_path / "bare.npy", _images(32))  # no sidecar: the process is unknown, not the preset's
    pretrain(PretrainConfig(**TINY, epochs=1, seed=0), open_store(tmp_path / "bare.npy"), out=tmp_path / "q.pt",
             progress=False)
    assert load_prior(tmp_path / "q.pt")[1]["pretrain_config"]["process"] is None


def test_cli_refuses_an_unknown_model_or_a_too_large_batch_before_rendering(tmp_path, monkeypatch, _cli):
    import dprandp.pretrain as pretrain_api

    rendered = []
    monkeypatch.setattr(pretrain_api, "process_source", lambda *a, **k: rendered.append(a) or pytest.fail("rendered"))
    r = _cli("--process", "stylegan-oriented", "--num", "32", "--model", "wrn-99", "--out", str(tmp_path / "p.pt"))
    assert r.returncode == 2 and "unknown model 'wrn-99'" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _cli("--process", "stylegan-oriented", "--num", "32", "--batch-size", "64", "--out", str(tmp_path / "p.pt"))
    assert r.returncode == 2 and "larger than the 32 images" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not rendered


def test_a_failed_write_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A full disk or file-size limit mid-run: one line, exit 1, no temporary file (found in review: a
    40-line traceback from torch's zip writer)."""
    import os
    import resource
    import subprocess
    import sys

    np.save(tmp_path / "s.npy", _images(32))

    def limit():  # 64 KiB files: the prior (~1 MB) cannot be written; Python ignores SIGXFSZ, so EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    cmd = [sys.executable, "-m", "dprandp", "pretrain", "--images", str(tmp_path / "s.npy"), "--preset", "cpu",
           "--model", "wrn-10-1", "--hidden", "32", "--batch-size", "16", "--epochs", "1", "--threads", "1",
           "--no-progress", "--out", str(tmp_path / "p.pt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("dprandp: error: cannot write"), r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]


def test_the_generators_sidecar_wins_over_an_unrelated_json_of_the_same_stem(tmp_path):
    from dprandp.pretrain import open_store

    np.save(tmp_path / "s.npy", _images(8))
    (tmp_path / "s.json").write_text('{"process": "something else"}')
    (tmp_path / "s.npy.json").write_text('{"process": "dead-leaves-shapes", "seed": 3}')
    assert open_store(tmp_path / "s.npy").describe()["store_meta"]["process"] == "dead-leaves-shapes"


def test_resume_on_a_store_regenerated_in_place_is_refused(tmp_path):
    """Same path, same shape, other pictures (found in review: the identity was path and shape only)."""
    from dprandp.pretrain import open_store

    config = PretrainConfig(**TINY, epochs=2, seed=2)
    np.save(tmp_path / "s.npy", _images(40, seed=0))
    pretrain(config, open_store(tmp_path / "s.npy"), out=tmp_path / "p.pt", progress=False, stop_after_epoch=1)
    np.save(tmp_path / "s.npy", _images(40, seed=1))
    with pytest.raises(InputError, match="was trained on other images"):
        pretrain(config, open_store(tmp_path / "s.npy"), out=tmp_path / "p.pt", progress=False, resume=True)
