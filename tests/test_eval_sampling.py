"""eval.sampling, eval.labels and eval.probes: patient-level nested fractions, k-shot draws, balanced test sets,
uncertainty policies with blanks always masked, task-set resolution errors, and the C grid choice on val."""
from __future__ import annotations

import numpy as np
import pytest

from eval.labels import TaskError, apply_uncertainty, check_labelled, resolve_tasks, select_targets
from eval.metrics import auroc
from eval.probes import fit_linear_probes
from eval.sampling import balanced_test_indices, fraction_subsets, kshot_indices
from ingest.schema import CHEXPERT_COMPETITION_TASKS, CHEXPERT_LABELS


def _pids(rng, num_patients=500):
    return np.repeat(np.arange(num_patients) * 7 + 3, rng.integers(1, 5, num_patients))  # 1-4 images each


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fractions_nested_and_never_split_a_patient(seed):
    pids = _pids(np.random.default_rng(seed))
    subsets = fraction_subsets(pids, (0.001, 0.01, 0.1, 1.0), seed=seed)
    fr = sorted(subsets)
    for small, large in zip(fr, fr[1:]):
        assert set(subsets[small]) <= set(subsets[large])
    num_patients = len(np.unique(pids))
    for f, idx in subsets.items():
        chosen = np.unique(pids[idx])
        # a patient is either wholly in the subset or wholly out of it
        assert np.array_equal(np.sort(idx), np.flatnonzero(np.isin(pids, chosen)))
        assert len(chosen) == max(1, int(np.ceil(f * num_patients)))
    assert len(subsets[1.0]) == len(pids)
    other = fraction_subsets(pids, (0.1,), seed=seed + 10)[0.1]
    assert not np.array_equal(other, subsets[0.1])
    assert np.array_equal(fraction_subsets(pids, (0.1,), seed=seed)[0.1], subsets[0.1])  # same seed, same draw
    with pytest.raises(ValueError, match="fraction"):
        fraction_subsets(pids, (0.0,))


def test_kshot_k_pos_k_neg_from_distinct_patients():
    rng = np.random.default_rng(0)
    pids = _pids(rng, 200)
    targets = rng.choice([0.0, 1.0, np.nan], size=(len(pids), 3), p=[0.5, 0.3, 0.2])
    targets[:, 2] = np.where(np.arange(len(pids)) < 4, 1.0, 0.0)  # too few positive patients for k = 10
    draws = kshot_indices(targets, pids, k=10, seed=3)
    for j in range(2):
        idx = draws[j]
        y = targets[idx, j]
        assert (y[:10] == 1).all() and (y[10:] == 0).all() and len(idx) == 20
        assert len(np.unique(pids[idx])) == 20  # no patient twice, none on both sides
    assert draws[2] is None
    again = kshot_indices(targets, pids, k=10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(draws[:2], again[:2]))
    assert not np.array_equal(kshot_indices(targets, pids, k=10, seed=4)[0], draws[0])


def test_balanced_test_set():
    y = np.array([1.0] * 7 + [0.0] * 30 + [np.nan] * 5)
    idx = balanced_test_indices(y, seed=0)
    assert (y[idx] == 1).sum() == 7 and (y[idx] == 0).sum() == 7


def test_uncertainty_policies_and_blanks_masked():
    raw = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    ign, zeros, ones = (apply_uncertainty(raw, p)[0] for p in ("u-ignore", "u-zeros", "u-ones"))
    assert ign[:2].tolist() == [1, 0] and np.isnan(ign[2]) and np.isnan(ign[3])
    assert zeros[:3].tolist() == [1, 0, 0] and np.isnan(zeros[3])  # blank is never a negative
    assert ones[:3].tolist() == [1, 0, 1] and np.isnan(ones[3])
    with pytest.raises(ValueError, match="policy"):
        apply_uncertainty(raw, "u-maybe")
    with pytest.raises(ValueError, match="label values"):
        apply_uncertainty(np.array([[2.0]]), "u-ignore")
    names = ["A", "B", "C", "D"]
    assert select_targets(raw, names, ["C", "A"], "u-ones").tolist() == [[1.0, 1.0]]


def test_task_sets_and_errors():
    assert resolve_tasks("all", list(CHEXPERT_LABELS)) == list(CHEXPERT_LABELS)
    assert resolve_tasks("chexpert5", list(CHEXPERT_LABELS)) == list(CHEXPERT_COMPETITION_TASKS)
    assert resolve_tasks("Edema,chexpert5", list(CHEXPERT_LABELS))[0] == "Edema"
    with pytest.raises(TaskError, match="unknown task 'Pneumonitis'") as e:
        resolve_tasks("Edema,Pneumonitis", list(CHEXPERT_LABELS), source="/data/shards")
    assert "\n" not in str(e.value)
    with pytest.raises(TaskError, match="no labels for task 'Atelectasis'"):
        resolve_tasks("chexpert5", ["Cardiomegaly", "Edema"], source="/data/shards")
    with pytest.raises(TaskError, match="no labels for task 'B'"):
        check_labelled(np.array([[1.0, np.nan], [0.0, np.nan]]), ["A", "B"], "train", "/data/shards")


def test_probe_picks_c_on_val_and_learns():
    rng = np.random.default_rng(0)
    n, d = 300, 40
    x = rng.normal(size=(n, d))
    w = np.zeros(d)
    w[:3] = 2.0
    y = (x @ w + rng.normal(size=n) > 0).astype(float)[:, None]
    y_train = y[:150].copy()
    y_train[:10] = np.nan  # masked rows are not used
    res = fit_linear_probes(x[:150], y_train, x[225:], ["t"], val_x=x[150:225], val_y=y[150:225], c_grid=(1e-4, 1e-2, 1.0))
    assert res.chosen_c["t"] in (1e-2, 1.0)
    assert auroc(y[225:, 0], res.test_scores[:, 0]) > 0.85
    one_class = fit_linear_probes(x[:20], np.ones((20, 1)), x[225:], ["t"], fixed_c=1.0)
    assert np.isnan(one_class.test_scores).all() and "one class" in one_class.notes[0]


def test_torch_probe_backend_matches_sklearn():
    rng = np.random.default_rng(1)
    n, d = 240, 20
    x = rng.normal(size=(n, d))
    y = (x[:, :2].sum(axis=1) + rng.normal(size=n) > 0).astype(float)[:, None]
    kw = dict(val_x=x[120:180], val_y=y[120:180], c_grid=(1e-3, 1e-1, 10.0))
    sk = fit_linear_probes(x[:120], y[:120], x[180:], ["t"], **kw)
    th = fit_linear_probes(x[:120], y[:120], x[180:], ["t"], backend="torch", **kw)
    assert sk.chosen_c == th.chosen_c
    assert np.allclose(sk.test_scores, th.test_scores, atol=2e-3)
