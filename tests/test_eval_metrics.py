"""eval.metrics and eval.bootstrap: AUROC / AUPRC equal scikit-learn's, NaN masking, one-class skipping, and the
patient bootstrap (deterministic, near-nominal coverage on a clustered synthetic case, paired differences)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from eval.bootstrap import bootstrap_ci, paired_bootstrap, patient_weights
from eval.metrics import accuracy, auprc, auroc, evaluate, weighted_auroc_auprc


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_auprc_equal_sklearn_random_cases(ties):
    rng = np.random.default_rng(1 + ties)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(2, 80))
        y = rng.integers(0, 2, n).astype(float)
        s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n) + y
        y[rng.random(n) < 0.2] = np.nan  # blank labels: masked
        keep = ~np.isnan(y)
        if len(np.unique(y[keep])) < 2:
            assert np.isnan(auroc(y, s))
            continue
        assert auroc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]), abs=1e-12)
        assert auprc(y, s) == pytest.approx(average_precision_score(y[keep], s[keep]), abs=1e-12)
        checked += 1
    assert checked > 100


def test_weighted_rows_equal_sklearn_sample_weight():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60).astype(bool)
    s = np.round(rng.normal(size=60) + y, 1)  # some ties
    w = rng.integers(0, 3, size=(5, 60)).astype(float)  # zero weights: samples not drawn
    a, p = weighted_auroc_auprc(y, s, w)
    for b in range(5):
        assert a[b] == pytest.approx(roc_auc_score(y, s, sample_weight=w[b]), abs=1e-12)
        assert p[b] == pytest.approx(average_precision_score(y, s, sample_weight=w[b]), abs=1e-12)


def test_evaluate_skips_one_class_task_with_note_and_mean_excludes_it():
    y = np.array([[1, 1, np.nan], [0, 1, 0], [1, 1, np.nan], [0, 1, 0]], dtype=float)
    s = np.array([[0.9, 0.2, 0.1], [0.1, 0.3, 0.2], [0.8, 0.5, 0.3], [0.3, 0.1, 0.4]])
    ev = evaluate(y, s, ["a", "b", "c"], with_accuracy=True)
    assert ev.tasks[0].auroc == 1.0 and ev.tasks[0].accuracy == 1.0
    assert "one class" in ev.tasks[1].note and "one class" in ev.tasks[2].note
    assert ev.mean_auroc == 1.0
    assert len(ev.notes) == 2


def test_accuracy_masks_blanks():
    assert accuracy(np.array([1, 0, np.nan, 1]), np.array([0.9, 0.6, 0.9, 0.4])) == pytest.approx(1 / 3)


def test_patient_weights_keep_patients_whole_and_are_seeded():
    pids = np.array([7, 7, 3, 9, 9, 9, 3])
    w = patient_weights(pids, 50, seed=11)
    assert w.shape == (50, 7)
    # every image of a patient carries that patient's draw count; total draws = number of patients
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all() and (w[:, 2] == w[:, 6]).all()
    assert np.allclose(w[:, [0, 2, 3]].sum(axis=1), 3)
    assert np.array_equal(w, patient_weights(pids, 50, seed=11))
    assert not np.array_equal(w, patient_weights(pids, 50, seed=12))


def test_bootstrap_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 2)).astype(float)
    s = rng.normal(size=(80, 2)) + y
    pids = np.repeat(np.arange(40), 2)
    a = bootstrap_ci(y, s, pids, ["x", "z"], num_replicates=300, seed=5)
    b = bootstrap_ci(y, s, pids, ["x", "z"], num_replicates=300, seed=5)
    c = bootstrap_ci(y, s, pids, ["x", "z"], num_replicates=300, seed=6)
    assert a == b
    assert a["mean_auroc_ci"] != c["mean_auroc_ci"]
    lo, hi = a["tasks"]["x"]["auroc_ci"]
    assert lo < auroc(y[:, 0], s[:, 0]) < hi


def _clustered_case(rng, num_patients, shift):
    # Two images per patient sharing a patient effect: images are correlated, patients are not.
    y = rng.integers(0, 2, num_patients)
    u = rng.normal(shift * y, 1.0)
    pids = np.repeat(np.arange(num_patients), 2)
    scores = u[pids] + rng.normal(0, 0.5, 2 * num_patients)
    return y[pids].astype(float), scores, pids


def test_patient_bootstrap_covers_known_auroc_at_about_nominal_rate():
    shift = 1.0
    true_auroc = norm.cdf(shift / np.sqrt(2 * (1 + 0.25)))  # pos - neg image score ~ N(shift, 2.5)
    covered_patient = covered_image = 0
    reps = 300
    for r in range(reps):
        y, s, pids = _clustered_case(np.random.default_rng(1000 + r), 80, shift)
        lo, hi = bootstrap_ci(y[:, None], s[:, None], pids, ["t"], num_replicates=200, seed=r)["tasks"]["t"]["auroc_ci"]
        covered_patient += lo <= true_auroc <= hi
        lo, hi = bootstrap_ci(y[:, None], s[:, None], np.arange(len(y)), ["t"],
                              num_replicates=200, seed=r)["tasks"]["t"]["auroc_ci"]
        covered_image += lo <= true_auroc <= hi
    assert 0.89 <= covered_patient / reps <= 0.985
    # Resampling images ignores the clustering and is too narrow: why the unit is the patient.
    assert covered_image / reps < covered_patient / reps - 0.05


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (200, 1)).astype(float)
    pids = np.arange(200) // 2
    good = y + rng.normal(0, 0.7, y.shape)
    weak = y + rng.normal(0, 2.0, y.shape)
    res = paired_bootstrap(y, good, weak, pids, ["t"], num_replicates=500, seed=0)
    diff = res["tasks"]["t"]
    assert diff["diff"] == pytest.approx(auroc(y[:, 0], good[:, 0]) - auroc(y[:, 0], weak[:, 0]))
    assert diff["ci"][0] > 0 and diff["p_value"] < 0.01
    same = paired_bootstrap(y, good, good, pids, ["t"], num_replicates=100, seed=0)["mean_auroc"]
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same test samples"):
        paired_bootstrap(y, good, good[:-1], pids, ["t"])
