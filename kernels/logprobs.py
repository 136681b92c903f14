"""Per-token log-probabilities from logits, in Triton (`logprobs_ref.py` is the same in PyTorch).

Bound by memory traffic: the forward reads each row once (online softmax) and saves lse, 4 bytes per
row; the backward reads z once more and writes dz. Row offsets are int64 (n * stride passes 2^31 at
N*V > 2.1e9). Footgun: the gradient goes to a new buffer, never into the logits: Triton stores do not
bump autograd's version counter, so anything else that saved the logits would silently see dz.
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.logprobs_ref import _as_3d, _empty


def _settings(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps), the one place block sizes are chosen (no autotune: the interpreter lacks
    it). GPU: 8192-wide blocks reach HBM speed. Interpreter: 1024, so test sizes cross block borders."""
    block = min(8192 if device.type == "cuda" else 1024, triton.next_power_of_2(V))
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


# ------------------------------------------------------------------------------------------ kernels

@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,  # (B, T, V) any dtype, last-dim stride 1
    targets_ptr, logp_ptr, lse_ptr,  # (B*T,) each: int32/int64 targets in; fp32 logp, lse out (lse for backward)
    T, stride_b, stride_t, V, ignore_index, BLOCK_V: tl.constexpr,
):
    # 1. Row n -> (b, t): a shifted logits[:, :-1] is read in place. int64 before any stride math.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    y = tl.load(targets_ptr + row).to(tl.int64)

    # 2. Ignored rows never read their logits: logp = 0 (and lse = 0, unused by backward).
    if y == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return

    # 3. One pass over the row: running max m and sum d of exp(z - m), both fp32.
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # upcast first
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # 4. The target logit is one more (cached) load; the dispatcher checked 0 <= y < V.
    z_y = tl.load(row_ptr + y).to(tl.float32)
    tl.store(logp_ptr + row, z_y - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,  # (B, T, V) as in forward
    targets_ptr, lse_ptr, grad_logp_ptr,  # (B*T,) each: int, fp32 lse from forward, fp32 upstream g
    grad_ptr,  # (B*T, V) out, contiguous, the logits' dtype
    T, stride_b, stride_t, V, ignore_index, BLOCK_V: tl.constexpr,
):
    # 1. This program's row and vocab block.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    grad_row_ptr = grad_ptr + row * V
    y = tl.load(targets_ptr + row).to(tl.int64)

    # 2. Ignored rows: an exact zero gradient, without reading logits or lse.
    if y == ignore_index:
        tl.store(grad_row_ptr + cols, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=mask)
        return

    # 3. Softmax recomputed from the saved lse; g * (onehot - p) formed in fp32 and rounded once,
    #    so the true-class entry g * (1 - p_y) keeps its precision when p_y -> 1.
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    p = tl.exp(z - tl.load(lse_ptr + row))
    g = tl.load(grad_logp_ptr + row)
    dz = g * (tl.where(cols == y, 1.0, 0.0) - p)
    tl.store(grad_row_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------- launchers: shapes, buffers, grid

def logprobs_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """logits (B, T, V) with unit last stride, targets (B*T,) -> logp (B*T,) fp32, lse (B*T,) fp32."""
    B, T, V = logits.shape
    logp, lse = _empty(B * T, torch.float32, logits.device), _empty(B * T, torch.float32, logits.device)
    if B * T > 0:
        block, warps = _settings(V, logits.device)
        _logprobs_fwd_kernel[(B * T,)](
            logits, targets, logp, lse, T, logits.stride(0), logits.stride(1), V, ignore_index,
            BLOCK_V=block, num_warps=warps)
    return logp, lse


def logprobs_bwd(logits, targets, lse, grad_logp, ignore_index, out=None):
    """-> grad (B, T, V) contiguous, in the logits' dtype: a new buffer, or `out`, which may be the logits
    themselves when nothing else holds them (each element is read, then written, by the same program)."""
    B, T, V = logits.shape
    grad = _empty((B, T, V), logits.dtype, logits.device) if out is None else out
    if B * T > 0:
        block, warps = _settings(V, logits.device)
        _logprobs_bwd_kernel[(B * T, triton.cdiv(V, block))](
            logits, targets, lse, grad_logp, grad, T, logits.stride(0), logits.stride(1), V, ignore_index,
            BLOCK_V=block, num_warps=warps)
    return grad


class LogprobsFunction(torch.autograd.Function):
    """Triton version of `logprobs_ref.token_logprobs_ref`: same arguments to `.apply`, same result."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        z3 = _as_3d(logits)  # (B, T, V): a view, also of a shifted slice
        if z3.stride(-1) != 1:
            z3 = z3.contiguous()  # the kernels read rows with unit stride
        y = targets.reshape(-1).contiguous()  # (B*T,)
        logp, lse = logprobs_fwd(z3, y, ignore_index)
        ctx.save_for_backward(z3, y, lse)
        ctx.ignore_index, ctx.shape = ignore_index, logits.shape
        return logp.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        z3, y, lse = ctx.saved_tensors
        g = grad_logp.reshape(-1).float().contiguous()  # (B*T,); `sum().backward()` hands an expanded view
        grad = logprobs_bwd(z3, y, lse, g, ctx.ignore_index)
        return grad.view(ctx.shape), None, None
