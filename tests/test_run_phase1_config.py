"""`dprandp run` pretrains with the Phase I preset named like its training preset."""

from dprandp.pipeline.run import DEMO_PRETRAIN, pretrain_config_for
from dprandp.pretrain import preset as pretrain_preset


def test_each_training_preset_gets_the_phase1_preset_of_the_same_name():
    paper = pretrain_config_for("paper", model="wrn-16-4")
    assert paper == pretrain_preset("paper")  # SPEC: WRN-16-4, 200 epochs, the 4096-wide head
    assert pretrain_config_for("cpu", model="wrn-16-1") == pretrain_preset("cpu")
    demo = pretrain_config_for("demo", model="wrn-10-1")
    assert (demo.model, demo.epochs, demo.num_images) == ("wrn-10-1", DEMO_PRETRAIN["epochs"], DEMO_PRETRAIN["num_images"])


def test_flags_override_the_phase1_preset_and_the_model_follows_phases_2_and_3():
    c = pretrain_config_for("paper", model="wrn-16-1", pretrain_preset="cpu", epochs=48, num_images=20_000, seed=3)
    assert (c.model, c.epochs, c.num_images, c.seed) == ("wrn-16-1", 48, 20_000, 3)
    assert c.hidden == pretrain_preset("cpu").hidden


def test_run_all_refuses_a_from_scratch_train_config_with_a_phase1_config(tmp_path):
    """preset(prior=None) drops Phase II (from scratch); pairing it with Phase I would silently
    train without linear probing. The Phase I prior is asked for by PHASE_I_PRIOR."""
    import pytest

    from dprandp.errors import InputError
    from dprandp.pipeline.config import preset
    from dprandp.pipeline.run import PHASE_I_PRIOR, RunConfig, run_all

    phase1 = pretrain_config_for("demo", model="wrn-10-1")
    scratch = preset("demo", prior=None)
    assert scratch.phase2_steps == 0 and preset("demo", prior=PHASE_I_PRIOR).phase2_steps == 30
    with pytest.raises(InputError, match="PHASE_I_PRIOR"):
        run_all(RunConfig(train=scratch, pretrain=phase1), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_interrupted_cached_prior_is_resumed_never_used_as_complete(tmp_path, monkeypatch):
    """Phase I rewrites the prior after every epoch: a run killed mid-way leaves a partial prior in
    the cache. The next run must finish it (from its training state), or train it again when the
    state is gone, and never take it for the complete prior."""
    from dprandp.pipeline.run import ensure_prior, prior_cache_path
    from dprandp.pretrain import PretrainConfig, pretrain, process_source
    from dprandp.pretrain.checkpoint import load_prior, state_path

    monkeypatch.setenv("DPRANDP_CACHE", str(tmp_path))
    c = PretrainConfig(model="wrn-10-1", hidden=32, out_dim=16, head_groups=4, batch_size=16, epochs=2,
                       num_images=32, image_size=32, process="stylegan-oriented", seed=0)
    path = prior_cache_path(c)
    path.parent.mkdir(parents=True)
    source = process_source(c.process, c.num_images, size=c.image_size, seed=c.seed)
    pretrain(c, source, out=path, stop_after_epoch=1)  # "killed" after epoch 1 of 2
    assert state_path(path).exists()
    logs = []
    assert ensure_prior(c, log=logs.append) == path
    assert load_prior(path)[1]["provenance"]["epochs_done"] == 2 and not state_path(path).exists()
    assert any("resuming the interrupted cached prior" in m for m in logs)
    logs.clear()
    ensure_prior(c, log=logs.append)  # now complete: reused as it is
    assert logs == [f"Phase I: using the cached prior {path}"]

    pretrain(c, source, out=path, overwrite=True, stop_after_epoch=1)
    state_path(path).unlink()  # a partial prior whose state is lost: trained again from scratch
    logs.clear()
    ensure_prior(c, log=logs.append)
    assert load_prior(path)[1]["provenance"]["epochs_done"] == 2
    assert any("is incomplete (1 of 2 epochs) and cannot be resumed" in m for m in logs)
