"""Per-token log-probabilities straight from hidden states and the lm_head weight, in Triton, without
ever materializing the (N, V) logits (`logprobs_ref.linear_token_logprobs_ref` is the same in PyTorch).

Forward: (token block, vocab split) programs compute logit tiles with `tl.dot`, keep a running max and
sum per token (online softmax) and pick out the target logit; the launcher merges the splits.
Backward: each (token block, vocab tile) program recomputes its tile from the saved lse (as Cut
Cross-Entropy does), forms dz in fp32 and adds dz @ W into dh and dz.T @ h into dW with fp32 atomics
(a bf16 accumulator would lose the small additions; atomic order varies, so the last bits can too).
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.logprobs_ref import _empty


def _settings(N: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes and launch options (no autotune: see logprobs.py). In the interpreter, tiles are large
    in N and H (fewer numpy calls) but 128 wide in V, so tests cross borders."""
    if device.type != "cuda":
        cfg = dict(BLOCK_N=max(16, min(64, triton.next_power_of_2(N))), BLOCK_V=128,
                   BLOCK_K=max(16, min(32, triton.next_power_of_2(H))), num_warps=4, num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)
    cfg["PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands
    return cfg


# ------------------------------------------------------------------------------------------ kernels

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """z[rows, cols] = h[rows] @ W[cols].T as a (BLOCK_N, BLOCK_V) fp32 tile; out-of-range rows/cols give 0."""
    z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)  # (BLOCK_V, BLOCK_K)
        # Operands stay in their dtype (tensor cores on GPU); the accumulator is fp32. (The CPU
        # interpreter multiplies bf16 wrongly, which is why CPU tests use fp32.)
        z = tl.dot(h, tl.trans(w), z, input_precision=PRECISION)
    return z


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr,  # (N, H), (V, H), any strides
    targets_ptr,  # (N,) int32/int64
    m_ptr, d_ptr, zy_ptr,  # (splits, N) fp32 out: partial max, sum of exp(z - max), target logit
    N, V, H, V_PER_SPLIT, stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # 1. This program's token block and vocab split; int64 before stride math.
    split = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(targets_ptr + rows, mask=rows < N, other=-1).to(tl.int64)
    v_start = split * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)

    # 2. Online logsumexp across the split's vocab tiles (the first tile always has a real column,
    #    so m is finite after it and exp(m - m_new) never sees -inf - -inf).
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    d = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                         BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        z = tl.where(cols[None, :] < V, z, float("-inf"))  # padding columns are not in the vocabulary
        m_new = tl.maximum(m, tl.max(z, axis=1))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # 3. The target logit, from whichever tile holds it (ignored targets match no column).
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    # 4. Partial results of this split; the launcher merges the splits.
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=rows < N)
    tl.store(d_ptr + out, d, mask=rows < N)
    tl.store(zy_ptr + out, z_y, mask=rows < N)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr,  # (N, H), (V, H)
    targets_ptr, lse_ptr, grad_logp_ptr,  # (N,) int, fp32 lse, fp32 upstream g
    dh_ptr, dw_ptr,  # (N, H), (V, H) fp32 accumulators, zero-filled, contiguous
    N, V, H, ignore_index, stride_hn, stride_hk, stride_wv, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    PRECISION: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    # 1. Program id -> (token block, vocab tile), GROUP_N token blocks per sweep of V, so concurrent
    #    atomics spread over several rows (as in Triton's matmul tutorial).
    pid = tl.program_id(0)
    n_blocks, n_tiles = tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V)
    first = (pid // (GROUP_N * n_tiles)) * GROUP_N
    group = tl.minimum(n_blocks - first, GROUP_N)
    pid_n = first + (pid % (GROUP_N * n_tiles)) % group
    pid_v = (pid % (GROUP_N * n_tiles)) // group
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)

    # 2. Per-token inputs; ignored and padding rows get g = 0, hence an exact zero gradient.
    y = tl.load(targets_ptr + rows, mask=rows < N, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    g = tl.load(grad_logp_ptr + rows, mask=rows < N, other=0.0)
    g = tl.where(y == ignore_index, 0.0, g)

    # 3. Recompute the logit tile; dz = g * (onehot - p) in fp32, then once to the operand dtype.
    z = _logits_tile(h_ptr, w_ptr, rows, cols, N, V, H, stride_hn, stride_hk, stride_wv, stride_wk,
                     BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
    p = tl.exp(z - lse[:, None])
    dz = g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    dz = tl.where(cols[None, :] < V, dz, 0.0).to(h_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_V)

    # 4. dh[rows] += dz @ W[cols];  dW[cols] += dz.T @ h[rows], one BLOCK_K slice of H at a time.
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        if COMPUTE_DH:
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                        mask=(cols[:, None] < V) & (ks[None, :] < H), other=0.0)
            tl.atomic_add(dh_ptr + rows[:, None] * H + ks[None, :], tl.dot(dz, w, input_precision=PRECISION),
                          mask=(rows[:, None] < N) & (ks[None, :] < H), sem="relaxed")
        if COMPUTE_DW:
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                        mask=(rows[:, None] < N) & (ks[None, :] < H), other=0.0)
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], tl.dot(tl.trans(dz), h, input_precision=PRECISION),
                          mask=(cols[:, None] < V) & (ks[None, :] < H), sem="relaxed")


# ------------------------------------------------------------- autograd: the launches and the merge

class LinearLogprobsFunction(torch.autograd.Function):
    """Triton version of `logprobs_ref.linear_token_logprobs_ref`: same arguments to `.apply`, same result."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        (N, H), V = hidden.shape, weight.shape[0]
        y = targets.contiguous()
        cfg = _settings(N, H, hidden.dtype, hidden.device)
        # Vocab splits, each a whole number of tiles: on the GPU enough (token block, split) programs to
        # fill it (~4 per SM); in the interpreter 2 tiles per split, so tests cross splits.
        n_tiles, n_blocks = triton.cdiv(V, cfg["BLOCK_V"]), triton.cdiv(max(N, 1), cfg["BLOCK_N"])
        if hidden.is_cuda:
            programs = 4 * torch.cuda.get_device_properties(hidden.device).multi_processor_count
            tiles_per_split = triton.cdiv(n_tiles, max(1, min(n_tiles, programs // n_blocks)))
        else:
            tiles_per_split = 2
        v_per_split = tiles_per_split * cfg["BLOCK_V"]
        splits = triton.cdiv(V, v_per_split)
        m, d, z_y = (_empty((splits, N), torch.float32, hidden.device) for _ in range(3))
        if N > 0:
            _linear_logprobs_fwd_kernel[(n_blocks, splits)](
                hidden, weight, y, m, d, z_y, N, V, H, v_per_split,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), **cfg)
        # Merge the splits: lse = M + log sum_s d_s exp(m_s - M). (splits, N) floats: negligible work.
        m_max = m.amax(dim=0)
        lse = m_max + torch.log(torch.sum(d * torch.exp(m - m_max), dim=0))
        ctx.save_for_backward(hidden, weight, y, lse)
        ctx.ignore_index = ignore_index
        return torch.where(y == ignore_index, 0.0, z_y.sum(dim=0) - lse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, y, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]  # at least one, or autograd would not call backward
        (N, H), V = hidden.shape, weight.shape[0]
        cfg = _settings(N, H, hidden.dtype, hidden.device)
        dh = torch.zeros((N, H) if need_dh else (0,), dtype=torch.float32, device=hidden.device)
        dw = torch.zeros((V, H) if need_dw else (0,), dtype=torch.float32, device=hidden.device)
        if N > 0:
            grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
            _linear_logprobs_bwd_kernel[grid](
                hidden, weight, y, lse, grad_logp.float().contiguous(), dh, dw, N, V, H, ctx.ignore_index,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                GROUP_N=8, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, **cfg)
        return (dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None), None, None
