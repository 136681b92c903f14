"""Per-token log-probabilities from hidden states and the lm_head weight, fast on a GPU: per token chunk,
z = h_c @ W.T in cuBLAS and the Triton logits kernel (`logprobs.py`); the backward recomputes z and writes
dz over it. Unlike the fused kernel, whose backward is bound by fp32 atomics, the products run at cuBLAS
speed. Numerics are eager's: the logits are rounded to the operand dtype.
"""
import torch
from torch.autograd.function import once_differentiable

from kernels.logprobs import logprobs_bwd, logprobs_fwd
from kernels.logprobs_ref import _empty, _row_chunks

GPU_CHUNK_ELEMENTS = 1 << 28  # logits per chunk on the GPU: 512 MiB in bf16
CPU_CHUNK_ELEMENTS = 1 << 12  # in the interpreter (tests): small, so test sizes cross chunk borders


def _chunks(N: int, V: int, device: torch.device) -> list[slice]:
    elements = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return [ts for _, ts in _row_chunks(1, N, V, elements)]


class ChunkedLinearLogprobsFunction(torch.autograd.Function):
    """Chunked cuBLAS + Triton version of `logprobs_ref.linear_token_logprobs_ref`: same arguments, same result."""

    # Under CUDA autocast the products run in bf16; custom_bwd puts the forward's autocast state back
    # for the backward, so the logits it recomputes are the ones the forward's lse came from.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, ignore_index):
        N, V = hidden.shape[0], weight.shape[0]
        y = targets.contiguous()
        logp, lse = _empty(N, torch.float32, hidden.device), _empty(N, torch.float32, hidden.device)
        for ts in _chunks(N, V, hidden.device):
            z = hidden[ts] @ weight.T  # (C, V) in the operands' dtype, fp32 accumulation inside cuBLAS
            logp[ts], lse[ts] = logprobs_fwd(z[None], y[ts], ignore_index)
        ctx.save_for_backward(hidden, weight, y, lse)
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, y, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]  # at least one, or autograd would not call backward
        N, V = hidden.shape[0], weight.shape[0]
        g = grad_logp.float().contiguous()
        dh = _empty(hidden.shape, hidden.dtype, hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for ts in _chunks(N, V, hidden.device):
            z = hidden[ts] @ weight.T  # (C, V) recomputed
            dz = logprobs_bwd(z[None], y[ts], lse[ts], g[ts], ctx.ignore_index, out=z[None])[0]  # over z
            if need_dh:
                dh[ts] = dz @ weight.to(dz.dtype)  # (C, H)
            if need_dw:
                if dz.dtype == torch.float32:
                    dw.addmm_(dz.T, hidden[ts])  # (V, H) += (V, C) @ (C, H)
                else:  # one (V, H) product in the 16-bit dtype, summed in fp32
                    dw += dz.T @ hidden[ts].to(dz.dtype)
        return dh, (dw.to(weight.dtype) if need_dw else None), None, None
