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
