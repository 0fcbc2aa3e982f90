"""Private hyperparameter tuning with an accounted budget (Papernot & Steinke, ICLR 2022).

Choosing among several runs by their score on private validation data leaks more than one run's
epsilon. Here the number of runs is random, each run draws its hyperparameters at random, its
score is a noisy count, and only the best run is released; :func:`tuning_epsilon` bounds the whole.
"""

from dprandp.tuning.accounting import calibrate_tuning_noise, candidate_event, selection_epsilon, tuning_epsilon
from dprandp.tuning.repetitions import Repetitions
from dprandp.tuning.search import Selected, noisy_count, private_search

__all__ = ["Repetitions", "Selected", "calibrate_tuning_noise", "candidate_event", "noisy_count", "private_search",
           "selection_epsilon", "tuning_epsilon"]
