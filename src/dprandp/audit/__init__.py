"""Empirical privacy auditing: does the DP-SGD engine leak more than its accountant claims?

* :mod:`dprandp.audit.statistics`: the one-run audit statistics of Steinke, Nasr & Jagielski
  (2023): p-values and lower bounds on ε from canary guesses.
* :mod:`dprandp.audit.canaries`: the white-box gradient-canary experiment run through the real
  DP-SGD engine (Poisson sampling, per-sample clipping, Gaussian noise).
"""

from dprandp.audit.statistics import (
    AuditBound,
    audit_scores,
    epsilon_lower_bound,
    guess_grid,
    guesses_from_scores,
    p_value,
)

__all__ = [
    "AuditBound",
    "audit_scores",
    "epsilon_lower_bound",
    "guess_grid",
    "guesses_from_scores",
    "p_value",
]
