"""Private hyperparameter tuning: the sampler against scipy, the bound against an exact divergence."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

from dprandp.accounting import DPPhase
from dprandp.errors import InputError
from dprandp.tuning import (
    Repetitions,
    calibrate_tuning_noise,
    noisy_count,
    private_search,
    selection_epsilon,
    tuning_epsilon,
)

SHAPES = [0.0, 0.5, 1.0, 2.0, math.inf]


def scipy_pmf(rep: Repetitions, k: np.ndarray) -> np.ndarray:
    """P(K = k) from scipy's distributions: an independent reference for the sampler and the pmf."""
    if rep.poisson:
        return stats.poisson(rep.mean).pmf(k)
    g = rep.gamma
    if rep.shape == 0:
        return stats.logser(1 - g).pmf(k)
    if rep.shape == 1:
        return stats.geom(g).pmf(k)
    nb = stats.nbinom(rep.shape, g)
    return np.where(k >= 1, nb.pmf(k) / (1 - nb.pmf(0)), 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_pmf_and_the_mean_are_scipys(shape):
    rep = Repetitions(mean=4.0, shape=shape)
    k = np.arange(0, 400)
    ref = scipy_pmf(rep, k)
    np.testing.assert_allclose([rep.pmf(int(i)) for i in k], ref, rtol=1e-9, atol=1e-300)
    assert float((k * ref).sum()) == pytest.approx(rep.accounted_mean, rel=1e-9)
    assert rep.accounted_mean == pytest.approx(4.0, rel=1e-9)
    assert rep.accounted_mean <= 4.0 * (1 + 1e-12)


def _frequency_pvalue(draws: np.ndarray, rep: Repetitions, top: int = 12) -> float:
    """Chi-square p-value of the draws' frequencies (bins 0..top-1 and a tail) against scipy's pmf."""
    counts = np.bincount(np.minimum(draws, top), minlength=top + 1)
    p = scipy_pmf(rep, np.arange(top))
    expected = len(draws) * np.append(p, 1 - p.sum())
    keep = expected > 5
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    return float(stats.chi2(keep.sum() - 1).sf(chi2))


@pytest.mark.parametrize("shape", SHAPES)
def test_the_sampler_draws_from_the_accounted_distribution(shape):
    rep = Repetitions(mean=3.0, shape=shape)
    rng = np.random.default_rng(1234)
    draws = np.array([rep.sample(rng) for _ in range(40_000)])
    if not rep.poisson:
        assert draws.min() >= 1
    assert _frequency_pvalue(draws, rep) > 1e-4


def test_a_sampler_with_the_wrong_gamma_fails_the_same_check():
    """The frequency check has power: geometric draws at mean 3.3 are told apart from mean 3."""
    draws = np.random.default_rng(1234).geometric(1 / 3.3, size=40_000)
    assert _frequency_pvalue(draws, Repetitions(mean=3.0, shape=1.0)) < 1e-6


def test_the_accountant_is_told_a_gamma_no_larger_than_the_sampled_one():
    """dp-accounting re-derives gamma from the mean it is given; a smaller gamma is the safe side."""
    rdp = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    if not hasattr(rdp, "_gamma_truncated_negative_binomial"):
        pytest.skip("this dp-accounting version hides how it maps the mean to gamma")
    for shape in (0.0, 0.5, 2.0):
        rep = Repetitions(mean=5.0, shape=shape)
        theirs = rdp._gamma_truncated_negative_binomial(shape, rep.accounted_mean)
        assert theirs <= rep.gamma and theirs == pytest.approx(rep.gamma, rel=1e-8)


def _max_of_k_distribution(p: np.ndarray, rep: Repetitions) -> np.ndarray:
    """Exact output distribution of "the largest of K draws from p" (plus 'nothing' when K = 0)."""
    k = np.arange(0, 2000)
    pk = np.array([rep.pmf(int(i)) for i in k])
    cdf = np.concatenate([[0.0], np.cumsum(p)])
    below = np.array([(pk * c ** k).sum() for c in cdf])  # P(max <= bucket) = E[F^K]
    return np.append(np.diff(below), pk[0])


def _exact_epsilon(a: np.ndarray, b: np.ndarray, delta: float) -> float:
    def hockey(eps):
        return max(np.maximum(a - math.exp(eps) * b, 0).sum(), np.maximum(b - math.exp(eps) * a, 0).sum())

    lo, hi = 0.0, 60.0
    for _ in range(100):
        lo, hi = ((lo + hi) / 2, hi) if hockey((lo + hi) / 2) > delta else (lo, (lo + hi) / 2)
    return hi


@pytest.mark.parametrize("shape,mean", [(0.0, 10.0), (0.5, 10.0), (1.0, 10.0), (2.0, 5.0), (math.inf, 10.0)])
def test_the_bound_holds_on_an_exactly_computable_selection_and_one_runs_epsilon_does_not(shape, mean):
    """Base mechanism: 4-ary randomized response (neighbours move its mode); tuning releases the
    largest of K outputs. Its exact epsilon lies between one run's epsilon and the accountant's."""
    k, p, delta = 4, 0.3, 1e-5
    one, other = np.full(k, p / k), np.full(k, p / k)
    one[0] += 1 - p
    other[1] += 1 - p
    rep = Repetitions(mean=mean, shape=shape)
    exact = _exact_epsilon(_max_of_k_distribution(one, rep), _max_of_k_distribution(other, rep), delta)
    base = dp_accounting.dp_event.RandomizedResponseDpEvent(p, k)
    bound = selection_epsilon(base, rep, target_delta=delta, neighboring=dp_accounting.NeighboringRelation.REPLACE_ONE)
    single = math.log((1 - p + p / k) / (p / k))  # one run of randomized response, exactly
    assert exact <= bound
    assert exact > single + 0.5  # selection leaks more than one run: one run's epsilon is not a guarantee


def test_calibration_meets_the_target_and_no_less_noise_would():
    phases = [DPPhase(sample_rate=0.02, noise_multiplier=0.0, steps=60),
              DPPhase(sample_rate=0.02, noise_multiplier=0.0, steps=240)]
    rep = Repetitions(mean=3.0)
    sigma, eps = calibrate_tuning_noise(target_epsilon=1.0, target_delta=1e-5, phases=phases, score_noise=20.0,
                                        repetitions=rep, rtol=1e-3)
    assert eps <= 1.0
    less = tuning_epsilon([p.with_noise(sigma * 0.997) for p in phases], score_noise=20.0, repetitions=rep,
                          target_delta=1e-5)
    assert less > 1.0
    one_run = dp_accounting.rdp.RdpAccountant()
    one_run.compose(dp_accounting.ComposedDpEvent([p.with_noise(sigma).dp_event() for p in phases]))
    assert one_run.get_epsilon(1e-5) < 0.8  # the tuned noise buys a much smaller per-run epsilon


def test_a_score_noise_too_small_for_the_target_is_a_clear_error():
    phases = [DPPhase(sample_rate=0.02, noise_multiplier=0.0, steps=10)]
    with pytest.raises(InputError, match="score noise"):
        calibrate_tuning_noise(target_epsilon=0.5, target_delta=1e-5, phases=phases, score_noise=0.5,
                               repetitions=Repetitions(mean=10.0))


@pytest.mark.parametrize("kwargs,match", [({"mean": 0.5}, "mean"), ({"mean": 1.0}, "mean"),
                                          ({"mean": 3.0, "shape": -1.0}, "shape"), ({"mean": math.inf}, "mean"),
                                          # the truncated sampler would redraw ~5e8 times (it hung)
                                          ({"mean": 3.0, "shape": 1e-9}, r"probability 1\.9e-09"),
                                          ({"mean": 1e9}, "at most 1000")])  # a search that never ends
def test_bad_repetitions_are_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        Repetitions(**kwargs)


def test_the_smallest_shape_allowed_accepts_one_draw_in_a_thousand_and_samples():
    from dprandp.tuning.repetitions import MIN_ACCEPTANCE

    shape = 1e-3
    reps = Repetitions(mean=3.0, shape=shape)
    assert -math.expm1(shape * math.log(reps.gamma)) >= MIN_ACCEPTANCE == 1e-3
    assert all(reps.sample(np.random.default_rng(i)) >= 1 for i in range(20))  # about 1e3 redraws each


def test_private_search_releases_only_the_best_of_k_uniformly_drawn_runs():
    rep = Repetitions(mean=5.0)
    k_expected = rep.sample(np.random.default_rng(7))
    calls, discarded = [], []

    def run(candidate, index):
        calls.append(candidate)
        return float(candidate * 10 + index), f"model-{index}"

    best = private_search([1, 2, 3], run, repetitions=rep, rng=np.random.default_rng(7), discard=discarded.append)
    assert len(calls) == k_expected and k_expected >= 2
    assert best.score == max(c * 10 + i for i, c in enumerate(calls))
    assert sorted(discarded + [best.result]) == sorted(f"model-{i}" for i in range(k_expected))


def test_private_search_draws_candidates_uniformly_and_independently():
    seen = []
    rng = np.random.default_rng(3)
    for _ in range(300):
        private_search(["a", "b", "c"], lambda c, i: (seen.append(c) or 0.0, None), repetitions=Repetitions(mean=4.0),
                       rng=rng)
    counts = np.array([seen.count(c) for c in "abc"])
    assert stats.chisquare(counts).pvalue > 1e-4


def test_private_search_with_no_run_releases_nothing():
    rep = Repetitions(mean=1.0, shape=math.inf)
    rng = np.random.default_rng(0)
    outcomes = [private_search([1], lambda c, i: (1.0, "m"), repetitions=rep, rng=rng) for _ in range(200)]
    assert any(o is None for o in outcomes) and any(o is not None for o in outcomes)


def test_noisy_count_has_the_stated_std():
    rng = np.random.default_rng(0)
    draws = np.array([noisy_count(100, noise=20.0, rng=rng) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(100, abs=0.6) and draws.std() == pytest.approx(20.0, rel=0.03)


# --- the search over real (tiny) training runs ------------------------------------------------

def _tiny_search(tmp_path, rng_seed, val_fraction=0.25, **grid):
    from pipeline_helpers import make_prior, tiny_npz

    from dprandp.pipeline import preset
    from dprandp.tuning.runs import TuningConfig, tune

    data, prior = tiny_npz(tmp_path / "tiny.npz", n_train=80), make_prior(tmp_path / "prior.pt")
    base = preset("demo", dataset="npz", data=data, model="wrn-10-1", prior=prior, batch_size=16, augmult=1,
                  physical_batch_size=16, steps=3, phase2_steps=1, target_epsilon=8.0, checkpoint_every=3,
                  eval_every=0, val_fraction=val_fraction)
    tuning = TuningConfig.from_mapping(grid or {"lr_phase3": [0.1, 0.5]}, repetitions=Repetitions(mean=2.5))
    messages = []
    record = tune(base, tuning, out=tmp_path / "search", progress=False, log=messages.append,
                  rng=np.random.default_rng(rng_seed))
    return record, messages, base


def test_a_search_releases_one_model_and_the_accounting_and_nothing_about_the_other_runs(tmp_path):
    import json

    import torch

    record, messages, base = _tiny_search(tmp_path, rng_seed=2)
    k = Repetitions(mean=2.5).sample(np.random.default_rng(2))
    assert sum("candidate run" in m for m in messages) == k >= 2
    out = tmp_path / "search"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "private-run", "tuning.json"]  # the losers are gone
    assert record["epsilon"] <= base.target_epsilon and record["released"]["settings"]["lr_phase3"] in (0.1, 0.5)
    assert record["epsilon_of_one_run_alone"] < record["epsilon"]
    assert set(record) == {"target_epsilon", "target_delta", "epsilon", "accountant", "noise_multiplier",
                           "epsilon_of_one_run_alone", "repetitions", "score", "score_noise", "num_val",
                           "split_seed", "grid", "released"}  # nothing counts the runs
    assert set(record["released"]) == {"model", "settings", "noisy_val_correct", "noisy_val_accuracy"}
    # the released model file states the search's epsilon, and holds no time and no run count
    from dprandp.pipeline import load_model

    _, meta = load_model(out / "model.pt")
    assert meta["epsilon"] == pytest.approx(record["epsilon"]) and meta["epsilon_of_one_run_alone"] < meta["epsilon"]
    assert meta["settings"] == record["released"]["settings"] and "search_candidate" not in meta
    # its validation split is the search's (the base seed), not the one the run's own random seed would carve
    assert meta["val_split"] == {"fraction": 0.25, "seed": base.seed} != {"fraction": 0.25, "seed": meta["train_config"]["seed"]}
    assert meta["search"] == {k: v for k, v in record.items() if k != "released"}
    released, private = (torch.load(p, weights_only=True)["state_dict"] for p in (out / "model.pt",
                                                                                  out / "private-run" / "model.pt"))
    assert all(torch.equal(released[name], private[name]) for name in private)
    # the selected run's own directory says what it is and that it stays private
    summary = json.loads((out / "private-run" / "summary.json").read_text())
    assert summary["search_epsilon"] == pytest.approx(record["epsilon"])
    assert summary["noise_multiplier"] == pytest.approx(record["noise_multiplier"])
    report = (out / "private-run" / "report.html").read_text()
    assert "candidate of a private hyperparameter search" in report and "Keep this directory private" in report


def test_a_failing_run_counts_as_a_lost_run_and_the_search_goes_on(tmp_path, monkeypatch):
    import dprandp.pipeline.trainer as trainer

    real, calls = trainer.train, []

    def first_run_diverges(config, **kwargs):
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("loss became nan at step 2")
        return real(config, **kwargs)

    monkeypatch.setattr(trainer, "train", first_run_diverges)
    record, messages, _ = _tiny_search(tmp_path, rng_seed=2)
    assert len(calls) == 2 and any("failed" in m for m in messages)
    assert record["released"] is not None and (tmp_path / "search" / "model.pt").is_file()
    assert not list((tmp_path / "search").glob(".candidate-*"))


def test_a_search_under_torchrun_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="torchrun"):
        _tiny_search(tmp_path, 0)


@pytest.mark.parametrize("grid,match", [({"steps": [3, 4]}, "unchanged"), ({"lr_phase3": []}, "no values")])
def test_a_grid_that_would_change_the_mechanism_or_is_empty_is_refused(tmp_path, grid, match):
    with pytest.raises(InputError, match=match):
        _tiny_search(tmp_path, 0, **grid)
    assert not (tmp_path / "search").exists()


def test_a_candidate_whose_chunk_cannot_fit_in_memory_is_refused_before_the_search(tmp_path):
    """Inside the search a failing run only counts as lost: a grid value no machine can hold (10^5 views
    per sample) would have spent budget on runs that all failed; it is refused before anything is written."""
    with pytest.raises(InputError, match="physical chunk of .* x 100000 views"):
        _tiny_search(tmp_path, 0, augmult=[1, 100000])
    assert not (tmp_path / "search").exists()


def test_a_search_without_a_validation_split_is_refused_before_it_writes(tmp_path):
    with pytest.raises(InputError, match="val-fraction"):
        _tiny_search(tmp_path, 0, val_fraction=0.0)
    assert not (tmp_path / "search").exists()


def test_an_interrupted_search_leaves_no_run_behind(tmp_path, monkeypatch):
    import dprandp.pipeline.trainer as trainer

    real, calls = trainer.train, []

    def train_then_fail(config, **kwargs):
        calls.append(config)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config, **kwargs)

    monkeypatch.setattr(trainer, "train", train_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _tiny_search(tmp_path, rng_seed=2)
    # nothing left, not even the empty --out, which would refuse the same command run again
    assert not (tmp_path / "search").exists()


def test_a_search_whose_out_lies_inside_class_folders_is_refused_before_any_run(tmp_path):
    """Found in review: train() refuses an output inside an imagefolder --data, but inside a search a refused
    run only counts as lost: the search ran every candidate to nothing and left tuning.json among the classes."""
    from PIL import Image

    from dprandp.pipeline import preset
    from dprandp.tuning.runs import TuningConfig, tune

    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("L", (32, 32), 30 * i).save(tmp_path / "images" / cls / f"{i}.png")
    base = preset("demo", dataset="imagefolder", data=str(tmp_path / "images"), model="wrn-10-1", prior=None,
                  batch_size=4, augmult=1, steps=2, phase2_steps=0, target_epsilon=8.0, target_delta=1e-3,
                  val_fraction=0.25)
    with pytest.raises(InputError, match="whose folders are read as classes"):
        tune(base, TuningConfig.from_mapping({"lr_phase3": [1.0, 2.0]}, repetitions=Repetitions(mean=2.0)),
             out=tmp_path / "images" / "search", progress=False, rng=np.random.default_rng(0))
    assert not (tmp_path / "images" / "search").exists()
