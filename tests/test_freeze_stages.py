"""--freeze-stages: Phase III fine-tunes all but the trunk's first k stages.

The privacy argument is unchanged (clipping bounds the gradient of the trainable parameters, the
only ones noised and updated), so what is tested is that exactly the right parameters train, that
their clipped per-sample gradients match a loop of batch-size-1 backward passes, and that the
frozen stages really are untouched and cost no graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import make_prior, tiny_npz
from test_privacy_clipping import clipped_reference, loop_reference

from dprandp.errors import InputError
from dprandp.models import WideResNet, WRNConfig, create_model
from dprandp.pipeline import preset, train
from dprandp.privacy import clipped_grad_sum


def test_stage_prefixes_cover_the_trunk_in_order():
    model = create_model("wrn-16-1", num_classes=10)
    stages = model.stage_prefixes()
    assert stages == (("trunk.0.", "trunk.1.", "trunk.2."), ("trunk.3.", "trunk.4."), ("trunk.5.", "trunk.6."))
    trunk = {n for n, _ in model.named_parameters() if n.startswith("trunk.")}
    covered = {n for n in trunk if any(n.startswith(p) for s in stages for p in s)}
    assert covered == trunk
    # the stage boundaries are where the width changes: 16 -> 32 -> 64 channels
    assert model.trunk[3].conv1.in_channels == 16 and model.trunk[5].conv1.in_channels == 32


def test_prefixes_do_not_collide_in_deep_trunks():
    """WRN-40: stage 1 is trunk.0-6; "trunk.1." must not freeze trunk.10-13 of stage 2."""
    deep = WideResNet(WRNConfig(depth=40, width=1))
    frozen = deep.frozen_prefixes(1)
    names = [n for n, _ in deep.named_parameters() if n.startswith(frozen)]
    assert names and all(int(n.split(".")[1]) <= 6 for n in names)
    assert deep.trunk[7].conv1.in_channels == 16 and deep.trunk[7].conv1.out_channels == 32


@pytest.mark.parametrize("stages", [-1, 3, 7])
def test_out_of_range_refused(stages):
    with pytest.raises(InputError, match="freeze-stages"):
        create_model("wrn-10-1", num_classes=5).frozen_prefixes(stages)


@pytest.mark.parametrize("method", ["layerwise", "vmap"])
@pytest.mark.parametrize("stages", [1, 2])
def test_clipped_grads_with_frozen_stages_match_loop(method, stages):
    """Clipping active (C below every norm): the norm is over the trainable parameters only."""
    model = create_model("wrn-10-1", num_classes=5, seed=3).double()
    frozen = model.frozen_prefixes(stages)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (4,), generator=gen)
    ref = loop_reference(model, x, y)
    ref_sum, ref_norms = clipped_reference(ref, 0.05)
    assert float(ref_norms.min()) > 0.05
    g, norms = clipped_grad_sum(model, x, y, max_grad_norm=0.05, method=method)
    assert set(g) == {n for n, p in model.named_parameters() if not n.startswith(frozen)}
    torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=1e-12)
    for n in g:
        torch.testing.assert_close(g[n], ref_sum[n], rtol=1e-8, atol=1e-12)


def test_frozen_stage_records_no_graph():
    model = create_model("wrn-10-1", num_classes=5, seed=3).double()
    frozen = model.frozen_prefixes(1)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    seen = {}
    for i, block in enumerate(model.trunk):
        block.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__(i, o.requires_grad))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    clipped_grad_sum(model, x, torch.tensor([0, 1, 2]), max_grad_norm=1.0)
    assert seen == {0: False, 1: False, 2: True, 3: True}


def test_pipeline_keeps_frozen_stages_at_the_prior(tmp_path: Path):
    """Phase II + III with --freeze-stages 1: stage 1 of the saved model is the prior's, bit for bit
    up to the EMA's float arithmetic; the later stages moved."""
    torch.set_num_threads(1)
    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    cfg = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=1,
                 physical_batch_size=16, steps=6, phase2_steps=2, noise_multiplier=2.0, target_epsilon=50.0,
                 eval_every=0, checkpoint_every=100, freeze_stages=1, lr_phase3=2.0)
    res = train(cfg, out=tmp_path / "run", progress=False)
    trunk = torch.load(prior, weights_only=True)["trunk"]
    state = torch.load(res.run_dir / "model.pt", weights_only=True)["state_dict"]
    frozen = create_model("wrn-10-1", num_classes=4).frozen_prefixes(1)
    moved = []
    for k, v in trunk.items():
        if f"trunk.{k}".startswith(frozen):
            torch.testing.assert_close(state[f"trunk.{k}"], v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            moved.append(not torch.allclose(state[f"trunk.{k}"], v))
    assert moved and all(moved)
    saved = json.loads((res.run_dir / "config.json").read_text())
    assert saved["train"]["freeze_stages"] == 1


def test_cli_refuses_freezing_every_stage(tmp_path: Path):
    from dprandp.cli.main import main

    data, prior = tiny_npz(tmp_path / "t.npz"), make_prior(tmp_path / "p.pt")
    for bad in ("3", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--dataset", "npz", "--data", data, "--prior", prior, "--model", "wrn-10-1",
                  "--freeze-stages", bad, "--out", str(tmp_path / "bad")])
        assert exc.value.code == 2
    assert not (tmp_path / "bad").exists()
