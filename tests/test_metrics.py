import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from din_kernels import metrics as M


def _gauc_loop(users, labels, scores):
    num = den = 0.0
    for u in np.unique(users):
        sel = users == u
        if labels[sel].min() == labels[sel].max():
            continue
        num += sel.sum() * roc_auc_score(labels[sel], scores[sel])
        den += sel.sum()
    return num / den


def test_gauc_matches_per_user_sklearn_loop():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 600)
    labels = (rng.random(600) < 0.4).astype(float)
    scores = np.round(rng.normal(size=600) + labels * 0.7, 1)  # rounded: many ties inside users
    users[:5], labels[:5] = 1000, 1  # a user with one class only: skipped
    assert M.gauc(users, labels, scores) == pytest.approx(_gauc_loop(users, labels, scores), abs=1e-12)


def test_gauc_hand_case():
    # user 0: AUC 1 (2 impressions), user 1: AUC 0.5 with a tie (4 impressions), user 2: one class (skipped)
    users = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.3, 0.4])
    # user 1: pairs (0.5 vs 0.5)=0.5, (0.5 vs 0.8)=0, (0.2 vs 0.5)=0, (0.2 vs 0.8)=0 -> 0.125
    assert M.gauc(users, labels, scores) == pytest.approx((2 * 1.0 + 4 * 0.125) / 6)
    assert math.isnan(M.gauc(np.zeros(3), np.ones(3), np.arange(3.0)))


def test_auc_logloss_relaimpr():
    labels = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.8, 0.3, 0.4, 0.9])
    assert M.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    p = np.array([0.2, 0.7, 0.6, 0.5, 0.9])
    expected = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert M.logloss(labels, p) == pytest.approx(expected)
    assert M.logloss([1, 0], [1.0, 0.0]) < 1e-6  # clipped, finite
    assert M.rela_impr(0.7, 0.6) == pytest.approx(1.0)  # (0.2 / 0.1) - 1
    assert M.rela_impr(0.6, 0.6) == 0.0
    with pytest.raises(ValueError, match="0.5"):
        M.rela_impr(0.7, 0.5)
    ev = M.evaluate(np.array([0, 0, 1, 1, 1]), labels, np.log(p / (1 - p)))
    assert ev["auc"] == pytest.approx(roc_auc_score(labels, p)) and ev["logloss"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="length"):
        M.gauc(np.zeros(3), np.zeros(4), np.zeros(4))
