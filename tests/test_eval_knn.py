"""Weighted kNN: chunked top-k equals the one-block and a brute-force reference (numpy and torch), label masking,
the protocol's counts and policy record, and `python -m eval knn` end to end with its one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.features import FeatureSet
from eval.knn import KnnError, knn_protocol, knn_scores, topk_cosine
from eval.labels import LabelPolicy


def _brute_scores(bank, y, query, k, t):
    """Reference: full similarity matrix, per task a full sort of the labelled bank, plain softmax weights."""
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = qn @ bn.T
    out = np.empty((len(query), y.shape[1]))
    for j in range(y.shape[1]):
        lab = np.flatnonzero(~np.isnan(y[:, j]))
        for i in range(len(query)):
            s = sim[i, lab]
            top = np.argsort(-s)[:k]
            w = np.exp(s[top] / t)
            out[i, j] = np.sum(w * y[lab[top], j]) / w.sum()
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(157, 24)).astype(np.float32)
    query = rng.normal(size=(41, 24)).astype(np.float32)
    y = (rng.random((157, 3)) < 0.4).astype(np.float32)
    y[rng.random((157, 3)) < 0.2] = np.nan  # masked labels are not votes
    return bank, y, query


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_chunked_topk_equals_one_block_and_brute_force(data, device):
    bank, y, query = data
    whole = topk_cosine(query, bank, 7, device=device, chunk_elements=10**9)
    for chunk in (1, 13, 157, 500):  # 1 x 1 blocks, blocks splitting the bank, one bank row of blocks
        part = topk_cosine(query, bank, 7, device=device, chunk_elements=chunk)
        assert np.array_equal(part.indices, whole.indices)
        np.testing.assert_allclose(part.similarity, whole.similarity, rtol=0, atol=1e-6)
    sim = l2(query) @ l2(bank).T
    assert np.array_equal(whole.indices, np.argsort(-sim, axis=1)[:, :7])
    np.testing.assert_allclose(whole.similarity, np.sort(sim, axis=1)[:, ::-1][:, :7], atol=1e-6)

    ref = _brute_scores(bank, y, query, 5, 0.07)
    for chunk in (7, 10**9):
        got = knn_scores(bank, y, query, k=5, temperature=0.07, device=device, chunk_elements=chunk)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)  # float32 similarities


def test_masked_bank_rows_never_vote_and_k_too_large_is_one_line(data):
    bank, y, query = data
    mask = ~np.isnan(y[:, 0])
    nb = topk_cosine(query, bank, 9, bank_mask=mask, chunk_elements=11)
    assert mask[nb.indices].all()
    with pytest.raises(KnnError, match=r"^task 'Edema': k = 200 is larger than the bank \(\d+ labelled training "
                                       r"images\)$"):
        knn_scores(bank, y, query, k=200, task_names=["Edema", "B", "C"])
    with pytest.raises(KnnError, match="larger than the bank"):
        topk_cosine(query, bank, 158)


def test_knn_protocol_counts_policy_and_signal():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 16)) * 3
    def fs(n, seed):
        r = np.random.default_rng(seed)
        cls = r.integers(0, 2, n)
        raw = cls.astype(np.float32)[:, None].repeat(2, 1)
        raw[::5, 1] = np.nan   # blank
        raw[1::7, 1] = -1      # uncertain
        x = (centres[cls] + r.normal(size=(n, 16))).astype(np.float32)
        return FeatureSet(x, raw, np.arange(n) // 2, ["A", "B"])
    train, val, test = fs(120, 2), fs(30, 3), fs(60, 4)
    zero, mask = LabelPolicy("zero", "u-ignore"), LabelPolicy("mask", "u-ones")
    res, preds = knn_protocol(train, val, test, ["A", "B"], policy=zero, k=10, num_replicates=100)
    assert res["label_policy"] == {"blank": "zero", "uncertain": "u-ignore"} and res["k"] == 10
    b = res["tasks"]["B"]
    blank, unc = np.isnan(train.labels[:, 1]), train.labels[:, 1] == -1
    assert b["n_train_pos"] == int(np.sum(train.labels[:, 1] == 1))
    assert b["n_train_neg"] == int(np.sum(train.labels[:, 1] == 0) + blank.sum())  # blank = negative
    assert b["n_val_pos"] + b["n_val_neg"] == 30 - int(np.sum(val.labels[:, 1] == -1))
    assert b["n_pos"] + b["n_neg"] == 60 - int(np.sum(test.labels[:, 1] == -1))
    assert (b["n_test_pos"], b["n_test_neg"]) == (b["n_pos"], b["n_neg"])
    assert res["tasks"]["A"]["auroc"] > 0.95 and res["tasks"]["A"]["auroc_ci"][0] > 0.85
    res_m, _ = knn_protocol(train, val, test, ["A", "B"], policy=mask, k=10, num_replicates=100)
    bm = res_m["tasks"]["B"]
    assert bm["n_train_pos"] == int(np.sum(train.labels[:, 1] == 1) + unc.sum())  # u-ones
    assert bm["n_train_neg"] == int(np.sum(train.labels[:, 1] == 0))  # blanks masked
    assert preds["scores"].shape == (60, 2)


def test_knn_cli_end_to_end_and_errors(tmp_path, capsys):
    from shardgen import make_shards

    from eval.__main__ import main as eval_main
    shards = make_shards(tmp_path / "shards", num_patients=24, size_px=40, seed=5)
    out = tmp_path / "eval"
    fast = ["--shards", shards, "--out", out, "--arch", "resnet18", "--image-size", "32", "--resize-size", "36",
            "--batch-size", "16", "--bootstrap", "100", "--init", "random", "--device", "cpu"]
    rc = eval_main([str(a) for a in ["knn", *fast, "--k", "3", "--temperature", "0.1", "--blank", "mask"]])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "knn" / "random-resnet18.json").read_text())
    assert res["k"] == 3 and res["temperature"] == 0.1 and res["label_policy"]["blank"] == "mask"
    assert res["eval_view"] in ("full", "center") and res["encoder"]["category"] == "Scratch"
    assert all("n_train_pos" in r and "n_val_neg" in r for r in res["tasks"].values())
    assert (out / "knn" / "random-resnet18.npz").is_file()
    capsys.readouterr()
    rc = eval_main([str(a) for a in ["knn", *fast, "--k", "500", "--overwrite"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "k = 500 is larger than the bank" in err, err
    rc = eval_main([str(a) for a in ["knn", *fast, "--blank", "maybe", "--overwrite"]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--blank" in err


def test_chunked_similarity_memory_is_bounded():
    """The numpy path never holds the query x bank similarity matrix: peak allocation stays near one block."""
    import tracemalloc
    rng = np.random.default_rng(3)
    bank = rng.normal(size=(20000, 32)).astype(np.float32)
    query = rng.normal(size=(400, 32)).astype(np.float32)
    full_matrix_bytes = 400 * 20000 * 4  # 32 MB
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    nb = topk_cosine(query, bank, 20, chunk_elements=200_000)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    # no bank-sized copy: a few block-sized temporaries (similarities, argpartition indices) and the bank norms
    assert peak < 24 * 200_000 + 8 * len(bank) < full_matrix_bytes / 5, peak
    ref = np.argsort(-(l2(query) @ l2(bank).T), axis=1)[:, :20]
    assert (nb.indices == ref).mean() > 0.999  # float32 near-ties may swap neighbours of equal similarity


def l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.gpu
def test_gpu_topk_matches_numpy_on_a_large_bank():
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(200_000, 256)).astype(np.float32)
    query = rng.normal(size=(300, 256)).astype(np.float32)
    y = (rng.random((200_000, 2)) < 0.3).astype(np.float32)
    cpu = knn_scores(bank, y, query, k=20, device="cpu", chunk_elements=1 << 24)
    gpu = knn_scores(bank, y, query, k=20, device="gpu", chunk_elements=1 << 24)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
