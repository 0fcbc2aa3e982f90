"""Classification metrics against references written from their definitions."""

import itertools

import numpy as np
import pytest

from scipy.special import softmax

from dprandp.pipeline.metrics import classification_metrics


def auc_by_pairs(scores, positive):
    """ROC-AUC as the Mann-Whitney statistic: P(score of a positive > score of a negative), ties 1/2."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def balanced_accuracy_by_classes(predicted, labels):
    return np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)])


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_metrics_match_their_definitions(num_classes):
    rng = np.random.default_rng(num_classes)
    n = 60
    labels = rng.integers(0, num_classes, n)
    labels[:num_classes] = np.arange(num_classes)  # every class present
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    logits[5] = logits[6]  # ties in the scores
    out = classification_metrics(logits, labels)
    predicted = logits.argmax(1)
    assert out["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_by_classes(predicted, labels), abs=1e-12)
    p = softmax(logits, axis=1)
    if num_classes == 2:  # MedMNIST: the score is the probability of class 1
        expected = auc_by_pairs(p[:, 1], labels == 1)
    else:  # macro mean of one-vs-rest AUCs
        expected = np.mean([auc_by_pairs(p[:, c], labels == c) for c in range(num_classes)])
    assert out["auc"] == pytest.approx(expected, abs=1e-12)


def test_majority_class_predictor_is_exposed_by_balanced_accuracy_and_auc():
    """The sharp edge on imbalanced medical data: 73 % accuracy from predicting one class."""
    labels = np.array([1] * 73 + [0] * 27)
    logits = np.tile([0.0, 1.0], (100, 1))  # always class 1, the same score for every image
    out = classification_metrics(logits, labels)
    assert out["accuracy"] == pytest.approx(0.73)
    assert out["balanced_accuracy"] == pytest.approx(0.5)
    assert out["auc"] == pytest.approx(0.5)


def test_auc_is_none_when_a_class_has_no_example():
    labels = np.array([0, 1, 0, 1])
    out = classification_metrics(np.random.default_rng(0).normal(size=(4, 3)), labels)
    assert out["auc"] is None and out["accuracy"] is not None


def test_labels_as_a_column_and_shape_errors():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    assert classification_metrics(logits, np.array([[0], [1], [1]]))["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="N x C"):
        classification_metrics(logits, np.array([0, 1]))


def test_the_train_commands_result_names_balanced_accuracy_and_auc(capsys):
    from dprandp.cli.train import print_result

    summary = {"test_accuracy": 0.731, "num_test": 156, "epsilon": 1.0, "delta": 1e-5, "steps": 100,
               "noise_multiplier": 8.9, "test_balanced_accuracy": 0.5, "test_auc": 0.8061, "test_accuracy_flip": None}
    print_result(summary, "runs/x", as_json=False)
    out = capsys.readouterr().out
    assert "balanced accuracy 50.00 %, ROC-AUC 0.8061 (test" in out
    print_result({**summary, "test_auc": None}, "runs/x", as_json=False)
    assert "balanced accuracy 50.00 % (test" in capsys.readouterr().out
