"""eval.sampling, eval.labels and eval.probes: patient-level nested fractions, the fraction-matched validation subset,
k-shot draws, balanced test sets, the label policy (blank = negative by default, or masked; the -1 policies), label
counts (also on the real CheXpert CSV), task-set resolution errors, and the C grid choice on val."""
from __future__ import annotations

import numpy as np
import pytest

from eval.labels import (LabelPolicy, TaskError, apply_policy, apply_uncertainty, as_policy, check_labelled,
                         label_counts, resolve_tasks, select_targets, split_counts)
from eval.metrics import auroc, balanced_accuracy
from eval.probes import fit_linear_probes
from eval.sampling import balanced_test_indices, fraction_subsets, kshot_indices, matched_val_subset
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


def test_label_policies_blank_negative_by_default():
    raw = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    default = apply_policy(raw, LabelPolicy())[0]
    assert default[[0, 1, 3]].tolist() == [1, 0, 0] and np.isnan(default[2])  # blank = negative, -1 ignored
    masked = {u: apply_policy(raw, LabelPolicy(blank="mask", uncertain=u))[0]
              for u in ("u-ignore", "u-zeros", "u-ones")}
    assert masked["u-ignore"][:2].tolist() == [1, 0] and np.isnan(masked["u-ignore"][2:]).all()
    assert masked["u-zeros"][:3].tolist() == [1, 0, 0] and np.isnan(masked["u-zeros"][3])
    assert masked["u-ones"][:3].tolist() == [1, 0, 1] and np.isnan(masked["u-ones"][3])
    assert apply_policy(raw, LabelPolicy(uncertain="u-ones"))[0].tolist() == [1, 0, 1, 0]
    # apply_uncertainty keeps its old meaning (blanks masked): only the -1 policy is applied
    assert np.array_equal(apply_uncertainty(raw, "u-zeros"), masked["u-zeros"][None], equal_nan=True)
    with pytest.raises(ValueError, match="uncertainty policy 'u-maybe'"):
        LabelPolicy(uncertain="u-maybe")
    with pytest.raises(ValueError, match="blank-label policy 'drop'"):
        LabelPolicy(blank="drop")
    with pytest.raises(ValueError, match="label values"):
        apply_policy(np.array([[2.0]]), LabelPolicy())
    # a bare uncertainty name is refused: a call site that forgot the blank policy must not get one silently
    with pytest.raises(TypeError, match="LabelPolicy"):
        select_targets(raw, ["A", "B", "C", "D"], ["C"], "u-ones")
    assert as_policy("u-ones") == LabelPolicy(blank="zero", uncertain="u-ones")
    names = ["A", "B", "C", "D"]
    assert select_targets(raw, names, ["D", "C", "A"], LabelPolicy(uncertain="u-ones")).tolist() == [[0.0, 1.0, 1.0]]
    assert LabelPolicy(blank="mask").to_json() == {"blank": "mask", "uncertain": "u-ignore"}
    assert "blank = negative" in LabelPolicy().describe()


def test_label_counts_and_split_counts():
    t = np.array([[1, 0], [0, np.nan], [1, 1], [np.nan, 0]], dtype=np.float32)
    assert label_counts(t, ["A", "B"]) == {"A": {"pos": 2, "neg": 1, "masked": 1},
                                           "B": {"pos": 1, "neg": 2, "masked": 1}}
    both = split_counts({"train": t, "test": t[:2]}, ["A", "B"])
    assert both["A"] == {"n_train_pos": 2, "n_train_neg": 1, "n_test_pos": 1, "n_test_neg": 1}
    with pytest.raises(ValueError, match="disagree"):
        label_counts(t, ["A"])


def test_chexpert_csv_counts_under_both_blank_policies(shared_data):
    """Counts per task on the full real CheXpert train CSV (frontal images), read through the ingest CheXpert reader
    and the label policy, equal counts taken directly from the CSV with pandas."""
    import pandas as pd

    from ingest.schema import CHEXPERT_LABELS
    from ingest.sources.chexpert import read_csv_records
    csv = shared_data / "metadata" / "chexpert_train.csv.gz"
    records, rejects = read_csv_records(csv, "trainval")
    assert not rejects
    frontal = [r for r in records if r.view != "LAT"]
    raw = np.array([[np.nan if r.labels[n] is None else r.labels[n] for n in CHEXPERT_LABELS] for r in frontal],
                   dtype=np.float32)
    df = pd.read_csv(csv)
    df = df[df["Frontal/Lateral"] == "Frontal"]
    assert len(df) == len(frontal)
    tasks = list(CHEXPERT_LABELS)
    for blank in ("zero", "mask"):
        for uncertain in ("u-ignore", "u-ones"):
            got = label_counts(select_targets(raw, tasks, tasks, LabelPolicy(blank, uncertain)), tasks)
            for t in tasks:
                vc = df[t].value_counts(dropna=False)
                n1, n0, nu = (int(vc.get(1.0, 0)), int(vc.get(0.0, 0)), int(vc.get(-1.0, 0)))
                nb = int(df[t].isna().sum())
                pos = n1 + (nu if uncertain == "u-ones" else 0)
                neg = n0 + (nb if blank == "zero" else 0)
                assert got[t] == {"pos": pos, "neg": neg, "masked": len(df) - pos - neg}, (blank, uncertain, t)
    # the figures quoted when masking blanks was the default: the probe then sees 29,720 vs 1,025 for Atelectasis
    masked = label_counts(select_targets(raw, tasks, tasks, LabelPolicy(blank="mask")), tasks)
    zeroed = label_counts(select_targets(raw, tasks, tasks, LabelPolicy()), tasks)
    assert masked["Atelectasis"] == {"pos": 29720, "neg": 1025, "masked": 130419 + 29863}
    assert zeroed["Atelectasis"] == {"pos": 29720, "neg": 1025 + 130419, "masked": 29863}
    assert (masked["Cardiomegaly"]["pos"], masked["Cardiomegaly"]["neg"]) == (23385, 7869)
    assert (masked["Pleural Effusion"]["pos"], masked["Pleural Effusion"]["neg"]) == (76899, 25299)


def test_masking_and_zeroing_blanks_fit_different_probes():
    """Positives and explicit negatives differ in feature 1 only; blanks (not mentioned) differ from positives in
    feature 0. Masking blanks trains "positive vs explicitly negated" (feature 1) and cannot tell a positive from an
    unmentioned film; zeroing them learns feature 0 and does."""
    from eval.features import FeatureSet
    from eval.protocols import linear_protocol
    rng = np.random.default_rng(0)

    def split(n_pos, n_neg, n_blank, first_pid):
        x = np.concatenate([rng.normal([2, 0], 0.7, (n_pos, 2)), rng.normal([2, 3], 0.7, (n_neg, 2)),
                            rng.normal([-1, 0], 0.7, (n_blank, 2))]).astype(np.float32)
        raw = np.array([1.0] * n_pos + [0.0] * n_neg + [np.nan] * n_blank, dtype=np.float32)[:, None]
        return FeatureSet(x, raw, np.arange(first_pid, first_pid + len(x)), ["Effusion"])
    train, val, test = split(60, 20, 200, 0), split(30, 10, 100, 1000), split(40, 15, 150, 2000)
    results = {}
    for blank in ("zero", "mask"):
        res, preds = linear_protocol(train, val, test, ["Effusion"], policy=LabelPolicy(blank=blank),
                                     c_grid=(0.01, 1.0), num_replicates=50)
        results[blank] = (res, preds)
        assert res["label_policy"] == {"blank": blank, "uncertain": "u-ignore"}
        row = res["tasks"]["Effusion"]
        assert (row["n_train_pos"], row["n_val_pos"], row["n_test_pos"]) == (60, 30, 40)
        expected_neg = (220, 110, 165) if blank == "zero" else (20, 10, 15)
        assert (row["n_train_neg"], row["n_val_neg"], row["n_test_neg"]) == expected_neg
    y_zero = results["zero"][1]["targets"][:, 0]  # blank = negative: positives vs everything else
    au = {b: auroc(y_zero, results[b][1]["scores"][:, 0]) for b in results}
    assert au["zero"] > 0.95 and au["mask"] < 0.75, au
    blank_rows = np.isnan(test.labels[:, 0])
    assert results["mask"][1]["scores"][blank_rows, 0].mean() > 0.5 > results["zero"][1]["scores"][blank_rows, 0].mean()


def test_matched_val_subset_fraction_nesting_and_minimum_per_class():
    rng = np.random.default_rng(0)
    pids = _pids(rng, 400)
    y = np.where(rng.random((len(pids), 2)) < 0.1, 1.0, 0.0)
    y[:, 1] = np.where(rng.random(len(pids)) < 0.5, np.nan, y[:, 1])
    big = matched_val_subset(pids, y, 0.5, seed=3)
    assert big.num_patients == big.matched_patients == 200 and not big.enlarged
    assert np.array_equal(big.indices, np.flatnonzero(np.isin(pids, np.unique(pids[big.indices]))))  # whole patients
    assert np.array_equal(big.indices, fraction_subsets(pids, (0.5,), seed=3)[0.5])  # the train fractions' sampler
    small = matched_val_subset(pids, y, 0.01, seed=3)
    assert small.matched_patients == 4 and small.enlarged
    assert set(small.indices) <= set(big.indices)  # nested along one patient order
    sub = y[small.indices]
    for j in range(2):
        assert np.sum(sub[:, j] == 1) >= 5 and np.sum(sub[:, j] == 0) >= 5
    # one patient fewer would miss the minimum for some task: the subset is the smallest prefix that meets it
    order = np.random.default_rng(3).permutation(np.unique(pids))
    fewer = y[np.isin(pids, order[: small.num_patients - 1])]
    assert any(np.sum(fewer[:, j] == c) < 5 for j in range(2) for c in (0, 1))
    # a class the whole split lacks cannot be reached: the subset grows no further than its other needs
    y_rare = y.copy()
    y_rare[:, 0] = 0.0
    y_rare[0, 0] = 1.0
    assert matched_val_subset(pids, y_rare, 0.01, seed=3).num_patients < len(np.unique(pids))
    assert small.to_json()["enlarged"] is True


def test_balanced_accuracy():
    y = np.array([1, 1, 0, 0, 0, 0, np.nan])
    p = np.array([0.9, 0.2, 0.1, 0.1, 0.1, 0.7, 0.9])
    assert balanced_accuracy(y, p) == pytest.approx((0.5 + 0.75) / 2)
    assert np.isnan(balanced_accuracy(np.zeros(3), np.ones(3)))


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
    res = fit_linear_probes(x[:150], y_train, x[225:], ["t"], val_x=x[150:225], val_y=y[150:225],
                            c_grid=(1e-4, 1e-2, 1.0))
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


def test_small_probe_fits_hold_blas_to_one_thread(monkeypatch):
    # Each L-BFGS iteration is one matrix-vector product: on small sets BLAS threads only add wake-up cost, so the
    # fit runs single-threaded there and keeps the library's thread count on large ones.
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_info

    import eval.probes as probes
    seen = []
    real_fit = LogisticRegression.fit

    def spy(self, x, y, *a, **k):
        seen.append(max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
        return real_fit(self, x, y, *a, **k)
    monkeypatch.setattr(LogisticRegression, "fit", spy)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8))
    y = (x[:, 0] > 0).astype(float)[:, None]
    fit_linear_probes(x[:100], y[:100], x[100:], ["t"], fixed_c=1.0)
    assert seen == [1]
    monkeypatch.setattr(probes, "SINGLE_THREAD_FIT_ELEMENTS", 10)
    before = max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
    fit_linear_probes(x[:100], y[:100], x[100:], ["t"], fixed_c=1.0)
    assert seen[-1] == before
