"""loss.impl=auto's self-check (`trainer.ntxent.NTXent`): the fused kernel serves a run only if it agrees with
the reference on the first step's embeddings; an exception or a mismatch keeps the reference, says why in one line
and in metrics.jsonl. The kernels themselves need a GPU, so here a stand-in plays the fused entry (the real kernels
go through the same check in tests/test_fused_ntxent.py under TRITON_INTERPRET=1)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer import fused_ntxent
from trainer.losses import nt_xent_reference
from trainer.ntxent import CHECK_GRAD_RTOL, NTXent

ROOT = Path(__file__).resolve().parents[1]


def _stand_in(monkeypatch, kind: str) -> list:
    """Make auto consider the fused path eligible here and replace the kernel entry by ``kind`` of stand-in."""
    calls = []

    def fused(z_rows, z_cols, *args, **kwargs):
        calls.append(z_rows.dtype)
        ref = nt_xent_reference(z_rows, z_cols, *args, **kwargs)
        if kind == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
        if kind == "wrong_loss":
            return ref * 1.01
        if kind == "wrong_grad":  # the same value, a gradient 10x the tolerance off
            return ref + (z_rows - z_rows.detach()).sum() * (10 * CHECK_GRAD_RTOL) * z_rows.detach().norm()
        return ref

    monkeypatch.setattr(fused_ntxent, "nt_xent_fused", fused)
    monkeypatch.setattr(NTXent, "eligible", staticmethod(lambda device, dim: (True, "")))
    return calls


def _embeddings(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g).requires_grad_()


def test_agreeing_kernel_serves_the_run_after_one_check(monkeypatch, capsys):
    calls = _stand_in(monkeypatch, "agrees")
    impl = NTXent("auto", 0.1)
    z1, z2 = _embeddings()
    impl(z1, z2).backward()
    assert impl.active == "fused" and len(calls) == 2  # the check's own call, then the step's
    line = capsys.readouterr().out.strip()
    assert line.startswith("loss.impl=auto: fused NT-Xent agrees with the reference on R=12 C=12 D=8 float32")
    assert "\n" not in line and "loss 0.0e+00" in line
    impl(*_embeddings(seed=1))
    assert len(calls) == 3 and capsys.readouterr().out == ""  # checked once per run
    assert impl.log_fields() == {"loss_impl": "fused", "loss_impl_note": line}


@pytest.mark.parametrize("kind,needle", [
    ("raises", "the fused kernel raised RuntimeError: CUDA error: an illegal memory access was encountered (R=12"),
    ("wrong_loss", "relative error of loss above 1e-03 (loss) / 2e-02 (gradients): loss 1.0e-02"),
    ("wrong_grad", "relative error of d rows above"),
])
def test_exception_or_mismatch_keeps_the_reference_with_one_line(monkeypatch, capsys, kind, needle):
    calls = _stand_in(monkeypatch, kind)
    impl = NTXent("auto", 0.1)
    z1, z2 = _embeddings()
    loss = impl(z1, z2)
    loss.backward()
    ref1, ref2 = (z.detach().clone().requires_grad_() for z in (z1, z2))
    want = NTXent("reference", 0.1)(ref1, ref2)
    want.backward()
    assert torch.equal(loss.detach(), want.detach()) and torch.equal(z1.grad, ref1.grad)  # the step ran the reference
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("loss.impl=auto: falling back to the reference NT-Xent")
    assert needle in out, out
    assert impl.active == "reference" and len(calls) == 1
    impl(*_embeddings(seed=1))
    assert len(calls) == 1 and not impl.wants_16bit("cuda", 8)  # never again, and fp32 unit vectors from now on
    assert impl.log_fields()["loss_impl_note"] == out.strip()


def test_explicit_names_are_not_checked(monkeypatch):
    calls = _stand_in(monkeypatch, "wrong_loss")
    z1, z2 = _embeddings()
    fused = NTXent("fused", 0.1)(z1, z2)
    ref = NTXent("reference", 0.1)(z1, z2)
    assert len(calls) == 1 and fused.item() == pytest.approx(1.01 * ref.item())


def test_what_the_device_decides_is_decided_at_construction(monkeypatch, capsys):
    """Built for its device, the module settles auto's fallback and fused's refusal before any step, silently."""
    from trainer.config import load_config
    from trainer.methods import build_method
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # a machine with a GPU and triton, whatever this one has
    monkeypatch.setattr(fused_ntxent, "fused_available", lambda device: torch.device(device).type == "cuda")
    auto = NTXent("auto", 0.1, device="cpu", dim=8)
    assert auto.active == "reference" and auto.refusal == ""
    assert auto.log_fields() == {"loss_impl": "reference", "loss_impl_note": "loss.impl=auto: reference NT-Xent "
                                 "(tensors on cpu: the fused kernels run on CUDA)"}
    assert capsys.readouterr().out == ""  # only a self-check's outcome is announced
    wide = NTXent("auto", device="cuda", dim=512)
    assert wide.active == "reference" and wide.note.endswith("(embedding width 512 > the kernels' 256)")
    assert NTXent("auto", device="cuda", dim=128).active is None  # eligible: the first step checks the kernel
    refused = "loss.impl=fused needs triton and a CUDA device (this run is on cpu); use loss.impl=auto or reference"
    assert NTXent("fused", device="cpu").refusal == refused and NTXent("fused", device="cuda").refusal == ""
    cfg = load_config(None, ["loss.impl=fused", "data.source=synthetic"])
    method = build_method(cfg.loss, device=torch.device("cpu"), embed_dim=cfg.model.proj_dim)
    assert method.ntxent.refusal == refused and method.check_run(cfg, 1, torch.device("cpu")) == refused
    with pytest.raises(ValueError, match="unknown positives 'image'"):
        NTXent("auto", positives="image")


def test_a_run_records_the_fallback_in_metrics(monkeypatch, tmp_path, capsys):
    """The real entry point (in process, CPU): the fallback line on the console and in the first metrics row."""
    from trainer.pretrain import main
    _stand_in(monkeypatch, "raises")
    run = tmp_path / "run"
    assert main([str(ROOT / "trainer" / "configs" / "debug_cpu.toml"), "data.source=synthetic", "loss.impl=auto",
                 "data.synthetic_batches=2", "optim.total_steps=2", "run.log_every=1", f"run.out={run}",
                 "run.tensorboard=false", "run.progress=false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_impl"] for r in rows] == ["reference", "reference"]
    assert rows[0]["loss_impl_note"].startswith("loss.impl=auto: falling back to the reference NT-Xent for this "
                                                "run: the fused kernel raised RuntimeError")
    assert "loss_impl_note" not in rows[1]
    assert capsys.readouterr().out.count("falling back") == 1


def test_check_uses_at_most_check_max_rows_rows(monkeypatch):
    """A large batch is checked on its first rows against every column, so the reference fits beside the run."""
    from trainer import ntxent
    seen = []

    def fused(z_rows, z_cols, *args, **kwargs):
        seen.append((z_rows.shape[0], z_cols.shape[0], args[0].shape[0]))
        return nt_xent_reference(z_rows, z_cols, *args, **kwargs)

    monkeypatch.setattr(fused_ntxent, "nt_xent_fused", fused)
    monkeypatch.setattr(ntxent, "CHECK_MAX_ROWS", 5)
    z = F.normalize(torch.randn(12, 4), dim=1)
    labels = torch.arange(6).repeat(2)
    ok, why = NTXent.compare(z[6:], z, labels[6:], labels, 6, 0.1)
    assert ok and "R=5 C=12 D=4" in why and seen == [(5, 12, 5)]


def test_compare_tolerates_16bit_rounding_of_a_correct_kernel():
    """A kernel as exact as bf16 gradients can be (reference gradients rounded to bf16) passes the check."""
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(64).repeat(2)
    z = F.normalize(torch.randn(128, 32, generator=g), dim=1)

    class Rounded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad.bfloat16().float()

    def bf16_like(z_rows, z_cols, *args, **kwargs):
        return nt_xent_reference(Rounded.apply(z_rows), Rounded.apply(z_cols), *args, **kwargs)

    orig = fused_ntxent.nt_xent_fused
    try:
        fused_ntxent.nt_xent_fused = bf16_like
        ok, why = NTXent.compare(z, z, labels, labels, 0, 0.1)
    finally:
        fused_ntxent.nt_xent_fused = orig
    assert ok, why


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_real_kernels_pass_the_check_at_a_training_size(dtype):
    """One rank of a 4096-image global batch on 8 GPUs (R = 1024 rows, C = 8192 gathered views, D = 128), clustered
    like two views of one image: the check must accept the kernels, or every GPU run silently loses them."""
    g = torch.Generator().manual_seed(5)
    n = 4096
    centres = torch.randn(n, 128, generator=g)
    z = F.normalize(torch.cat([centres, centres]) + 0.5 * torch.randn(2 * n, 128, generator=g), dim=1)
    labels = torch.arange(n).repeat(2).cuda()
    z = z.cuda().to(dtype)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # the trainer's CUDA setting
    try:
        ok, why = NTXent.compare(z[3072:4096], z, labels[3072:4096], labels, 3072, 0.1)
    finally:
        torch.set_float32_matmul_precision(before)
    assert ok, why
