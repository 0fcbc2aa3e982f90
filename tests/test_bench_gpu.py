"""The GPU script's extrapolation of the paper run (bench/gpu.py), on hand-made timings."""

import pytest

from bench.gpu import extrapolate, pipeline_hours


def _row(phase, k, s):
    return {"model": "wrn-16-4", "phase": phase, "K": k, "physical": 512, "seconds_per_step": s}


def test_extrapolates_96_plus_779_steps_per_augmult_from_the_fastest_step():
    rows = [_row("II", 16, 2.0), _row("III", 16, 9.0), _row("III", 16, 8.0),  # two physical batches: fastest counts
            _row("II", 4, 0.5), _row("III", 4, 2.0),
            {"model": "wrn-16-4", "phase": "III", "K": 4, "physical": 4096, "error": "OutOfMemoryError"}]
    out = extrapolate(rows)
    assert out["gpu_hours_by_augmult"]["16"] == pytest.approx((96 * 2.0 + 779 * 8.0) / 3600)
    assert out["gpu_hours_by_augmult"]["4"] == pytest.approx((96 * 0.5 + 779 * 2.0) / 3600)
    assert out["paper_run_gpu_hours"] == out["gpu_hours_by_augmult"]["16"]  # the paper's K is the largest timed
    assert out["paper_run_seconds"] == pytest.approx(96 * 2.0 + 779 * 8.0)


def test_a_k_missing_a_phase_is_not_extrapolated():
    assert extrapolate([_row("III", 16, 8.0)]) == {}
    assert set(extrapolate([_row("II", 16, 2.0), _row("III", 16, 8.0), _row("III", 4, 2.0)])
               ["gpu_hours_by_augmult"]) == {"16"}


def test_bf16_rows_are_extrapolated_apart_from_the_papers_float32():
    rows = [dict(_row("II", 16, 2.0), precision="fp32"), dict(_row("III", 16, 8.0), precision="fp32"),
            dict(_row("II", 16, 1.0), precision="bf16"), dict(_row("III", 16, 3.0), precision="bf16"),
            dict(_row("III", 4, 1.0), precision="bf16")]  # K = 4 bf16 lacks Phase II: no estimate
    out = extrapolate(rows)
    assert out["paper_run_gpu_hours"] == pytest.approx((96 * 2.0 + 779 * 8.0) / 3600)  # never the bf16 rows
    assert out["gpu_hours_by_augmult_bf16"] == {"16": pytest.approx((96 * 1.0 + 779 * 3.0) / 3600)}
    assert extrapolate([dict(_row("II", 16, 1.0), precision="bf16"), dict(_row("III", 16, 3.0), precision="bf16")]
                       ).keys() == {"gpu_hours_by_augmult_bf16"}


def test_the_whole_pipeline_adds_phase_one_at_each_batch_to_each_dp_estimate():
    result = {"pretrain_throughput": {"rows": [
                  {"model": "wrn-16-4", "batch": 256, "images_per_s": 6000.0},
                  {"model": "wrn-16-4", "batch": 1024, "images_per_s": 10000.0},
                  {"model": "wrn-16-1", "batch": 512, "images_per_s": 9000.0}]},  # not the paper model
              "dp_steps": {"gpu_hours_by_augmult": {"16": 1.5, "4": 0.5}, "gpu_hours_by_augmult_bf16": {"16": 0.8}}}
    rows = pipeline_hours(result)
    assert len(rows) == 2 * 3
    paper = next(r for r in rows if r["phase1_batch"] == 256 and r["K"] == 16 and r["precision"] == "fp32")
    assert paper["hours"] == pytest.approx(105_000 * 200 / 6000 / 3600 + 1.5)
    fast = next(r for r in rows if r["phase1_batch"] == 1024 and r["K"] == 4)
    assert fast["hours"] == pytest.approx(105_000 * 200 / 10000 / 3600 + 0.5)
    assert pipeline_hours({}) == []


def test_cifar10_copies_are_found_within_the_depth_asked(tmp_path):
    from bench.gpu import find_cifar10

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "cifar-10-batches-py").mkdir()
    (tmp_path / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "d" / "e" / "cifar10.npz").write_bytes(b"")
    assert find_cifar10((str(tmp_path),), depth=3) == [str(tmp_path / "a" / "b" / "cifar-10-batches-py")]
    assert len(find_cifar10((str(tmp_path),), depth=6)) == 2
    assert find_cifar10((str(tmp_path / "missing"),)) == []
