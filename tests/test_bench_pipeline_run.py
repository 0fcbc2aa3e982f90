"""The end-to-end benchmark's split of wall time into Phase I and Phases II + III (bench/pipeline_run.py)."""

from bench.pipeline_run import phase1_seconds


def test_phase1_ends_at_the_first_line_of_the_private_phases():
    lines = [(20.0, "dprandp: Phase I: pretraining wrn-16-1 on 15000 stylegan-oriented images"),
             (300.0, "dprandp: Phase I: epoch 1/2: loss -1.2"),
             (580.0, "dprandp: Phase I: epoch 2/2: loss -1.5"),
             (600.0, "dprandp: cifar10: 50000 train, 10000 test; q = 0.02, sigma = 1.56"),
             (900.0, "dprandp: test accuracy 60.00 %")]
    assert phase1_seconds(lines) == 600.0


def test_no_phase1_when_the_prior_was_cached_or_given():
    cached = [(3.0, "dprandp: Phase I: using the cached prior /c/p.pt"), (9.0, "dprandp: digits: 1348 train")]
    assert phase1_seconds(cached) is None
    assert phase1_seconds([(9.0, "dprandp: digits: 1348 train")]) is None
