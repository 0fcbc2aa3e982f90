"""Classification metrics of a model's test logits: accuracy, balanced accuracy and ROC-AUC.

Accuracy is what CIFAR-10 papers report. On imbalanced data, such as medical scans, a model
that always predicts the common class has a high accuracy and learns nothing; balanced accuracy
(the mean recall over classes) and ROC-AUC (how well the scores rank each class above the rest)
expose it. AUC follows MedMNIST's evaluator: for two classes, the AUC of the softmax
probability of class 1; for more, the mean of the one-vs-rest AUCs of the softmax
probabilities (macro). The computations are scikit-learn's.
"""

from __future__ import annotations

import warnings

import numpy as np

#: The metric names, as they appear after ``{split}_`` in metrics.jsonl and summary.json.
METRICS = ("accuracy", "balanced_accuracy", "auc")


def classification_metrics(logits, labels, num_classes: int | None = None) -> dict[str, float | None]:
    """``accuracy``, ``balanced_accuracy`` and ``auc`` of ``logits`` (N x C) against ``labels``.

    ``auc`` is None where it is undefined: a class of the model that has no example among
    ``labels``, or a single class in ``labels``. Balanced accuracy averages the recall over the
    classes present in ``labels``.
    """
    from scipy.special import softmax
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"need N x C logits and N labels, got {logits.shape} and {labels.shape}")
    c = num_classes or logits.shape[1]
    predicted = logits.argmax(axis=1)
    out: dict[str, float | None] = {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": None,
        "auc": None,
    }
    with warnings.catch_warnings():  # a class predicted but absent from labels has no recall: not averaged
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(labels, predicted))
    if len(np.unique(labels)) == c and c >= 2:
        p = softmax(logits, axis=1)
        if c == 2:
            out["auc"] = float(roc_auc_score(labels, p[:, 1]))
        else:
            out["auc"] = float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=np.arange(c)))
    return out
