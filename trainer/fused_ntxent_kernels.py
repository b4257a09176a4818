"""Triton kernels of the fused NT-Xent loss: a forward with an online log-sum-exp per row, and two backward passes.

Kernels are built on first use by `build_kernels()` so that importing this module never imports triton.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

# Tiles used under TRITON_INTERPRET=1: the smallest tl.dot accepts, so small test sizes still cross tile edges.
INTERPRET_BLOCK_MN = 16
MAX_DIM = 256  # widest embedding with tile configs checked to fit (q and k tiles are BLOCK x D)


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: kernels defined from now on run in triton's CPU interpreter."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def interpreter_usable() -> bool:
    """Whether the interpreter can run our kernels: TRITON_INTERPRET=1 was already set when triton.language was
    imported (its own jit helpers such as tl.sum are fixed as compiled or interpreted at that moment)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return interpreting() and isinstance(tl.standard.sum, InterpretedFunction)


def _gpu_configs(triton, block_d: int, backward: bool) -> list:
    """A few tile shapes per embedding width; the autotuner drops those that exceed shared memory or registers."""
    cfg = triton.Config
    if block_d <= 64:
        shapes = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
    elif block_d <= 128:
        shapes = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 3)]
        if backward:
            shapes += [(128, 32, 4, 3)]
    else:
        shapes = [(64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (32, 64, 4, 3)]
    return [cfg({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotuning cost per (R, C, D, precision, dtypes): at most 5 tile configs per kernel, each timed for
# AUTOTUNE_WARMUP_MS + AUTOTUNE_REP_MS (triton's defaults are 25 + 100 ms), plus one compile each; the winner is kept
# in memory for the run and on disk (triton's cache) for the next one.
AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20


def _bounded_bench(kernel_call, quantiles):
    import triton.testing
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _prune_configs(configs: list, named_args: dict, **_) -> list:
    # fp32 (FMA or TF32) tiles need twice the registers and shared memory, and each one compiles for ~10-30 s:
    # try only the small ones
    if named_args["Q"].dtype == torch.float32:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small or configs[-1:]
    return configs


@functools.lru_cache(maxsize=4)
def build_kernels(interpret: bool, block_d: int) -> SimpleNamespace:
    """Compile-ready kernels for one embedding width; autotuned over tile shapes on a GPU, fixed tiles otherwise.

    ``interpret`` is part of the cache key because triton decides interpreter vs compiler when a kernel is defined.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _fwd(Q, K, RL, CL, LSE, CNT, LOSS, PART, R, C, D, row_offset, stride_q, stride_k, scale2,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
             DOT_F32: tl.constexpr, SPLIT: tl.constexpr):
        # One program owns BLOCK_M rows and streams the column tiles of its split past them: only (BLOCK_M,)
        # stats persist. With SPLIT, the (m, l, pos_sum, cnt) of each column split go to PART (4, splits, R).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split, n_split = tl.program_id(1), tl.num_programs(1)
        tiles_per_split = tl.cdiv(tl.cdiv(C, BLOCK_N), n_split)
        col_lo = split * tiles_per_split * BLOCK_N
        col_hi = tl.minimum(col_lo + tiles_per_split * BLOCK_N, C)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        dim_ok = dims < D
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
            q = q.to(tl.float32)
        rl = tl.load(RL + rows, mask=row_ok, other=0)
        self_col = rows + row_offset
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
        l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(x - m)
        pos_sum = tl.zeros([BLOCK_M], tl.float32)  # sum of positive logits, log2 units like m
        pos_cnt = tl.zeros([BLOCK_M], tl.float32)
        for start in range(col_lo, col_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < col_hi
            k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
                k = k.to(tl.float32)
            cl = tl.load(CL + cols, mask=col_ok, other=0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32
            keep = col_ok[None, :] & (cols[None, :] != self_col[:, None])
            x = tl.where(keep, qk * scale2, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            # a row whose columns were all masked so far has m = -inf; -inf - -inf would poison l with NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
            m = m_new
            pos = keep & (rl[:, None] == cl[None, :])
            pos_sum += tl.sum(tl.where(pos, x, 0.0), 1)
            pos_cnt += tl.sum(pos.to(tl.float32), 1)
        # base-2 LSE of the logits s/t; l >= 1 once any column is kept, and m = -inf (so LSE = -inf) otherwise.
        # Kept in log2 units: the backward's exp2(x - lse2) then matches the forward's x bit for bit, and a
        # round trip through natural log would cost ~1e-6 absolute, i.e. 1e-5 relative in dS where p ~ 1.
        if SPLIT:
            part = PART + split * R + rows
            tl.store(part, m, mask=row_ok)
            tl.store(part + n_split * R, l, mask=row_ok)
            tl.store(part + 2 * n_split * R, pos_sum, mask=row_ok)
            tl.store(part + 3 * n_split * R, pos_cnt, mask=row_ok)
        else:
            lse2 = m + tl.log2(tl.maximum(l, 1e-30))
            # subtract before converting to natural log: lse2 and the positive logits cancel to a small loss
            loss = tl.where(pos_cnt > 0, (lse2 - pos_sum / tl.maximum(pos_cnt, 1.0)) * 0.6931471805599453, 0.0)
            tl.store(LSE + rows, lse2, mask=row_ok)
            tl.store(CNT + rows, pos_cnt, mask=row_ok)
            tl.store(LOSS + rows, loss, mask=row_ok)

    @triton.jit
    def _bwd_rows(Q, K, RL, CL, LSE, COEF, INVP, SCALE, DQ, R, C, D, row_offset, stride_q, stride_k, stride_dq,
                  stride_split, scale2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, DS_SCALE: tl.constexpr, DS_SPLIT: tl.constexpr,
                  DOT_F32: tl.constexpr):
        # dQ_i = sum_j dS_ij K_j with dS_ij = coef_i (softmax_ij - [j positive] / P_i), recomputed tile by tile;
        # column split s writes its partial sum at DQ + s * stride_split (the host adds them, in order)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        tiles_per_split = tl.cdiv(tl.cdiv(C, BLOCK_N), tl.num_programs(1))
        col_lo = split * tiles_per_split * BLOCK_N
        col_hi = tl.minimum(col_lo + tiles_per_split * BLOCK_N, C)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < R
        dim_ok = dims < D
        q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
            q = q.to(tl.float32)
        rl = tl.load(RL + rows, mask=row_ok, other=0)
        lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0)
        coef = tl.load(COEF + rows, mask=row_ok, other=0.0) * DS_SCALE
        invp = tl.load(INVP + rows, mask=row_ok, other=0.0)
        active = invp > 0  # rows without positives have zero loss and zero gradient
        self_col = rows + row_offset
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(col_lo, col_hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < col_hi
            k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
                k = k.to(tl.float32)
            cl = tl.load(CL + cols, mask=col_ok, other=0)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            keep = active[:, None] & col_ok[None, :] & (cols[None, :] != self_col[:, None])
            p = tl.where(keep, tl.exp2(qk * scale2 - lse2[:, None]), 0.0)
            pos = keep & (rl[:, None] == cl[None, :])
            ds = coef[:, None] * (p - tl.where(pos, invp[:, None], 0.0))
            ds_hi = ds.to(Q.dtype.element_ty)
            acc += tl.dot(ds_hi.to(k.dtype), k, input_precision=PRECISION)
            if DS_SPLIT:  # bf16 keeps 8 bits of dS; its rounding remainder as a 2nd term restores ~16
                ds_lo = (ds - ds_hi.to(tl.float32)).to(Q.dtype.element_ty)
                acc += tl.dot(ds_lo.to(k.dtype), k, input_precision=PRECISION)
        acc = acc * (tl.load(SCALE) / DS_SCALE)
        tl.store(DQ + split * stride_split + rows[:, None] * stride_dq + dims[None, :], acc.to(DQ.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _bwd_cols(Q, K, RL, CL, LSE, COEF, INVP, SCALE, DK, R, C, D, row_offset, stride_q, stride_k, stride_dk,
                  stride_split, scale2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, DS_SCALE: tl.constexpr, DS_SPLIT: tl.constexpr,
                  DOT_F32: tl.constexpr, S_LIKE_FWD: tl.constexpr):
        # dK_j = sum_i dS_ij Q_i: one program owns BLOCK_N columns and streams the row tiles (no atomics needed).
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(1)  # row split: partial sums at DK + split * stride_split, as in _bwd_rows
        tiles_per_split = tl.cdiv(tl.cdiv(R, BLOCK_M), tl.num_programs(1))
        row_lo = split * tiles_per_split * BLOCK_M
        row_hi = tl.minimum(row_lo + tiles_per_split * BLOCK_M, R)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < C
        dim_ok = dims < D
        k = tl.load(K + cols[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
            k = k.to(tl.float32)
        cl = tl.load(CL + cols, mask=col_ok, other=0)
        acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(row_lo, row_hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < row_hi
            q = tl.load(Q + rows[:, None] * stride_q + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                        other=0.0)
            if DOT_F32:  # triton 3.9's interpreter multiplies bf16 tiles as raw uint16: widen
                q = q.to(tl.float32)
            rl = tl.load(RL + rows, mask=row_ok, other=0)
            lse2 = tl.load(LSE + rows, mask=row_ok, other=0.0)
            coef = tl.load(COEF + rows, mask=row_ok, other=0.0) * DS_SCALE
            invp = tl.load(INVP + rows, mask=row_ok, other=0.0)
            if S_LIKE_FWD:
                # the forward's operand order, so exp2(x - lse2) sees the very logits the LSE was built from
                # (fp32: otherwise a one-ulp disagreement shows up as ~1e-5 relative in dS where p ~ 1)
                kq = tl.trans(tl.dot(q, tl.trans(k), input_precision=PRECISION))  # (BLOCK_N, BLOCK_M)
            else:
                kq = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
            keep = (invp > 0)[None, :] & col_ok[:, None] & (cols[:, None] != (rows + row_offset)[None, :])
            p = tl.where(keep, tl.exp2(kq * scale2 - lse2[None, :]), 0.0)
            pos = keep & (cl[:, None] == rl[None, :])
            ds = coef[None, :] * (p - tl.where(pos, invp[None, :], 0.0))
            ds_hi = ds.to(Q.dtype.element_ty)
            acc += tl.dot(ds_hi.to(q.dtype), q, input_precision=PRECISION)
            if DS_SPLIT:  # bf16 keeps 8 bits of dS; its rounding remainder as a 2nd term restores ~16
                ds_lo = (ds - ds_hi.to(tl.float32)).to(Q.dtype.element_ty)
                acc += tl.dot(ds_lo.to(q.dtype), q, input_precision=PRECISION)
        acc = acc * (tl.load(SCALE) / DS_SCALE)
        tl.store(DK + split * stride_split + cols[:, None] * stride_dk + dims[None, :], acc.to(DK.dtype.element_ty),
                 mask=col_ok[:, None] & dim_ok[None, :])

    if interpret:
        fixed = {"BLOCK_M": INTERPRET_BLOCK_MN, "BLOCK_N": INTERPRET_BLOCK_MN, "DOT_F32": True}
        return SimpleNamespace(fwd=_fwd, bwd_rows=_bwd_rows, bwd_cols=_bwd_cols, fixed=fixed)
    # R and C are in the key: the best tile depends on how many programs fill the GPU (training shapes are fixed);
    # results are cached on disk so a restarted run does not re-tune.
    # PRECISION too: an fp32 tile tuned for exact FMA dots is not the best one for tf32 tensor cores
    tune = functools.partial(triton.autotune, key=["R", "C", "D", "PRECISION"], cache_results=True,
                             prune_configs_by={"early_config_prune": _prune_configs}, do_bench=_bounded_bench)
    return SimpleNamespace(fwd=tune(configs=_gpu_configs(triton, block_d, False))(_fwd),
                           bwd_rows=tune(configs=_gpu_configs(triton, block_d, True))(_bwd_rows),
                           bwd_cols=tune(configs=_gpu_configs(triton, block_d, True))(_bwd_cols),
                           fixed={"DOT_F32": False})


def _block_d(dim: int) -> int:
    import triton
    return max(16, triton.next_power_of_2(dim))


def fp32_dot_precision() -> str:
    """'tf32' or 'ieee': what torch's cuBLAS uses for an fp32 matmul right now, so the kernels' fp32 dots match it.

    set_float32_matmul_precision('high' | 'medium') -> 'tf32' (the trainer's CUDA setting); 'highest' (torch's
    default) -> 'ieee', exact fp32. The new per-backend API (torch.backends.cuda.matmul.fp32_precision) is read
    first: once it has been used, reading the legacy allow_tf32 flag raises.
    """
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")  # resolves inheritance from the globals
    if new in ("tf32", "ieee"):
        return new
    try:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    except RuntimeError:  # legacy and new APIs mixed: torch refuses to answer, so stay exact
        return "ieee"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's own matmul setting, so fused and reference see the same rounding policy;
    # 16-bit operands always use the tensor cores and ignore it (tf32 is only triton's default spelled out)
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


# Tests (and tuning experiments) set this to force a number of splits; None picks one from the GPU's size.
FORCE_SPLITS: int | None = None


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(outer: int, inner: int, device: torch.device) -> int:
    """How many pieces to cut the inner loop into so that few outer tiles still fill the GPU.

    A rank's R rows against C >> R gathered columns gives only R / BLOCK_M programs: with splits, each also takes
    a slice of the columns and the host merges the partial results (deterministically, in split order).
    """
    if FORCE_SPLITS is not None:
        return FORCE_SPLITS
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    outer_tiles = -(-outer // 64)  # the tile is autotuned later; 64 is the common choice
    if outer_tiles >= sms:  # a full wave already: splitting would only add partial buffers to merge
        return 1
    inner_tiles = -(-inner // 64)
    return max(1, min(-(-2 * sms // outer_tiles), inner_tiles // 4, 64))  # >= 4 tiles per split keep loads busy


def forward(z_rows, z_cols, row_labels, col_labels, row_offset: int, temperature: float):
    """Per-row (loss, base-2 LSE of the logits, positive count), each (R,) fp32; inputs contiguous, one dtype."""
    import triton
    rows, dim = z_rows.shape
    cols = z_cols.shape[0]
    k = build_kernels(interpreting(), _block_d(dim))
    splits = _splits(rows, cols, z_rows.device)
    lse = torch.empty(rows, device=z_rows.device, dtype=torch.float32)
    cnt = torch.empty_like(lse)
    loss = torch.empty_like(lse)
    part = torch.empty(4, splits, rows, device=z_rows.device, dtype=torch.float32) if splits > 1 else lse
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)  # noqa: E731
    k.fwd[grid](z_rows, z_cols, row_labels, col_labels, lse, cnt, loss, part, rows, cols, dim, row_offset,
                z_rows.stride(0), z_cols.stride(0), 1.4426950408889634 / temperature,
                BLOCK_D=_block_d(dim), PRECISION=_precision(z_rows.dtype), SPLIT=splits > 1, **k.fixed)
    if splits == 1:
        return loss, lse, cnt
    m, l, pos_sum, cnt = part.unbind(0)  # each (splits, R), log2 units like the kernel
    m_max = m.amax(0)
    m_safe = torch.where(torch.isinf(m_max), torch.zeros_like(m_max), m_max)  # rows with no kept column
    lse = m_max + torch.log2((l * torch.exp2(m - m_safe)).sum(0).clamp(min=1e-30))
    pos_sum, cnt = pos_sum.sum(0), cnt.sum(0)
    loss = torch.where(cnt > 0, (lse - pos_sum / cnt.clamp(min=1.0)) * 0.6931471805599453, torch.zeros_like(lse))
    return loss, lse, cnt


def backward(z_rows, z_cols, row_labels, col_labels, row_offset: int, temperature: float, lse, coef, inv_pos,
             coef_scale, need_rows: bool, need_cols: bool, split_bf16: bool = True):
    """(dz_rows, dz_cols) in the input dtype (None where not needed).

    ``coef`` (R,) is each row's upstream gradient / temperature divided by ``coef_scale`` (a 1-element fp32 tensor,
    the largest |coef|), so dS stays O(1) before it is rounded to 16 bits for the tensor-core matmul.
    dz_cols has its own column-major kernel rather than atomics into a shared buffer: the sums then have a fixed
    order (bitwise reproducible), and it costs one more recomputation of the logits than a fused pass would.
    """
    import triton
    rows, dim = z_rows.shape
    cols = z_cols.shape[0]
    k = build_kernels(interpreting(), _block_d(dim))
    common = dict(BLOCK_D=_block_d(dim), PRECISION=_precision(z_rows.dtype),
                  # fp16 has 5 exponent bits: softmax terms ~1/C would fall into subnormals without a lift
                  DS_SCALE=256.0 if z_rows.dtype == torch.float16 else 1.0,
                  # dS in bf16 alone costs ~4x the reference's gradient error (cancellation between softmax and
                  # positive terms); a second bf16 matmul on the remainder costs ~1/3 more backward time
                  DS_SPLIT=split_bf16 and z_rows.dtype == torch.bfloat16, **k.fixed)
    args = (z_rows, z_cols, row_labels, col_labels, lse, coef, inv_pos, coef_scale)
    scale2 = 1.4426950408889634 / temperature
    dz_rows = dz_cols = None
    if need_rows:
        splits = _splits(rows, cols, z_rows.device)
        out = torch.empty(splits, rows, dim, device=z_rows.device, dtype=torch.float32) if splits > 1 \
            else torch.empty_like(z_rows)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), splits)  # noqa: E731
        k.bwd_rows[grid](*args, out, rows, cols, dim, row_offset, z_rows.stride(0), z_cols.stride(0), dim,
                         rows * dim, scale2, **common)
        dz_rows = out.sum(0).to(z_rows.dtype) if splits > 1 else out
    if need_cols:
        splits = _splits(cols, rows, z_rows.device)
        out = torch.empty(splits, cols, dim, device=z_rows.device, dtype=torch.float32) if splits > 1 \
            else torch.empty_like(z_cols)
        grid = lambda meta: (triton.cdiv(cols, meta["BLOCK_N"]), splits)  # noqa: E731
        k.bwd_cols[grid](*args, out, rows, cols, dim, row_offset, z_rows.stride(0), z_cols.stride(0), dim,
                         cols * dim, scale2,
                         # 16-bit inputs skip the register transpose: their tolerance is 1e-2, not 1e-5
                         S_LIKE_FWD=z_rows.dtype == torch.float32, **common)
        dz_cols = out.sum(0).to(z_cols.dtype) if splits > 1 else out
    return dz_rows, dz_cols


def compile_for_target(arch: int, dtype: torch.dtype, dim: int, all_configs: bool = False,
                       ptx: dict | None = None) -> dict:
    """Compile every kernel for CUDA compute capability ``arch`` (e.g. 90) without a GPU; {name: [shared bytes]}.

    Lets CI on a CPU catch what the interpreter cannot: a kernel that fails to lower for the real target, or fp32
    dots that do not become tf32 tensor-core instructions under torch's 'high' precision (the interpreter ignores
    input_precision). The dot precision is the one a launch would use now; ``ptx`` receives {name: PTX text}.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    block_d = _block_d(dim)
    k = build_kernels(False, block_d)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    inputs = {"Q": ptr, "K": ptr, "RL": "*i64", "CL": "*i64", "LSE": "*fp32"}
    sizes = {"R": "i32", "C": "i32", "D": "i32", "row_offset": "i32", "stride_q": "i32", "stride_k": "i32"}
    grads = {"COEF": "*fp32", "INVP": "*fp32", "SCALE": "*fp32"}
    common = {"BLOCK_D": block_d, "PRECISION": _precision(dtype), "DOT_F32": False}
    fwd_signature = {**inputs, "CNT": "*fp32", "LOSS": "*fp32", "PART": "*fp32", **sizes, "scale2": "fp32"}
    bwd = dict(common, DS_SCALE=256.0 if dtype == torch.float16 else 1.0, DS_SPLIT=dtype == torch.bfloat16)
    specs = {
        "fwd": (k.fwd, fwd_signature, dict(common, SPLIT=False)),
        "fwd_split": (k.fwd, fwd_signature, dict(common, SPLIT=True)),
        "bwd_rows": (k.bwd_rows, {**inputs, **grads, "DQ": ptr, **sizes, "stride_dq": "i32", "stride_split": "i32",
                                  "scale2": "fp32"}, bwd),
        "bwd_cols": (k.bwd_cols, {**inputs, **grads, "DK": ptr, **sizes, "stride_dk": "i32", "stride_split": "i32",
                                  "scale2": "fp32"}, dict(bwd, S_LIKE_FWD=dtype == torch.float32)),
    }
    out = {}
    for name, (tuned, signature, constants) in specs.items():
        out[name] = []
        for cfg in tuned.configs if all_configs else tuned.configs[-1:]:
            consts = {**constants, **cfg.kwargs}
            src = ASTSource(tuned.fn, {**signature, **{c: "constexpr" for c in consts}}, consts)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                                               "enable_fp_fusion": True})
            out[name].append(compiled.metadata.shared)
            if ptx is not None:
                ptx[name] = compiled.asm["ptx"]
    return out
