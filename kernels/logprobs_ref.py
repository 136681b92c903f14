"""Per-token log-probabilities in plain PyTorch: the test oracle, the benchmark baseline, the CPU path.

    logp[n] = z[n, y_n] - logsumexp_v z[n, v]                  (0 where y_n == ignore_index)
    dz[n, v] = g[n] * (onehot(y_n)[v] - exp(z[n, v] - lse[n]))   (g: the upstream gradient)

`token_logprobs_eager` is the oracle; the `_ref` versions give its numbers in chunks, recomputing
softmax in backward, so no (N, V) tensor (nor an fp32 copy of a 16-bit weight) exists whole.
"""
import torch
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 22  # logits per chunk, 16 MiB fp32: few op calls (each syncs torch's pool), little memory
POISON = False  # tests set it: new buffers start as NaN, so an unwritten element cannot pass as stale memory


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def token_logprobs_eager(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log_softmax + gather. logits (..., V) float, targets (...) int -> (...) fp32 (fp64 for fp64 input)."""
    keep = targets != ignore_index
    z = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(keep, targets, 0).long().unsqueeze(-1))
    return torch.where(keep, logp.squeeze(-1), 0.0)


def linear_token_logprobs_eager(hidden, weight, targets, ignore_index=-100):
    """hidden (..., H) @ weight (V, H).T, then `token_logprobs_eager` (materializes the logits)."""
    return token_logprobs_eager(hidden @ weight.T, targets, ignore_index)


# ------------------------------------------------------------------ logits input, chunked over rows

def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (B, T, V), a view where possible: a shifted logits[:, :-1] stays a view."""
    return x.unsqueeze(0) if x.dim() == 2 else x.flatten(0, -3)  # flatten(0, 0) of a 3-D x is x itself


def _row_chunks(B: int, T: int, V: int, elements: int | None = None):
    """(b, slice of t) pieces of at most `elements` (default CHUNK_ELEMENTS) logits, in row order."""
    rows = max(1, (elements or CHUNK_ELEMENTS) // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, slice(t0, min(t0 + rows, T))


class TokenLogprobsRefFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        z3 = _as_3d(logits)  # (B, T, V)
        B, T, V = z3.shape
        keep = targets.reshape(B, T) != ignore_index
        safe_y = torch.where(keep, targets.reshape(B, T), 0).long()  # ignored rows read column 0
        logp = _empty((B, T), torch.float32, logits.device)
        for b, ts in _row_chunks(B, T, V):
            lsm = torch.log_softmax(z3[b, ts].float(), dim=-1)  # (C, V): eager's fused kernel, one chunk
            logp[b, ts] = torch.where(keep[b, ts], lsm.gather(-1, safe_y[b, ts, None]).squeeze(-1), 0.0)
        ctx.save_for_backward(logits, safe_y, keep)
        return logp.view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        logits, safe_y, keep = ctx.saved_tensors
        z3 = _as_3d(logits)
        B, T, V = z3.shape
        g = torch.where(keep, grad_logp.reshape(B, T).float(), 0.0)  # ignored rows: exact 0 gradient
        grad = _empty((B, T, V), logits.dtype, logits.device)  # a new buffer, never the logits
        for b, ts in _row_chunks(B, T, V):
            # dz goes straight into the gradient buffer when it is fp32, else through one fp32 chunk
            dz = grad[b, ts] if grad.dtype == torch.float32 else torch.empty(grad[b, ts].shape, device=grad.device)
            torch.mul(torch.softmax(z3[b, ts].float(), dim=-1), -g[b, ts, None], out=dz)  # -g * p, recomputed
            # footgun: the true-class term + g is added in fp32 *before* rounding to the logits' dtype;
            # for p_y -> 1 the bf16 difference of two rounded numbers is pure noise.
            dz.scatter_add_(-1, safe_y[b, ts, None], g[b, ts, None])
            if dz.dtype != grad.dtype:
                grad[b, ts] = dz
        return grad.view(logits.shape), None, None


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits (N, V) or (B, T, V), any strides, targets (N,) or (B, T) -> (N,) or (B, T) fp32."""
    return TokenLogprobsRefFunction.apply(logits, targets, ignore_index)


# ---------------------------------------- hidden states + lm_head weight, chunked over tokens and vocabulary

def _blocks(N: int, V: int, H: int):
    """Token chunks of C and vocabulary blocks of Vb with Vb x H and C x Vb about CHUNK_ELEMENTS numbers."""
    rows = max(1, min(V, CHUNK_ELEMENTS // max(H, 1)))  # Vb
    tokens = max(1, CHUNK_ELEMENTS // rows)  # C
    return ([slice(t, min(t + tokens, N)) for t in range(0, N, tokens)],
            [slice(v, min(v + rows, V)) for v in range(0, V, rows)])


def _target_column(safe_y, vs):
    """Which rows' target falls in vocabulary block vs, and its column there (clamped where it does not)."""
    inside = (safe_y >= vs.start) & (safe_y < vs.stop)
    return inside, (safe_y - vs.start).clamp(0, vs.stop - vs.start - 1)[:, None]


class LinearTokenLogprobsRefFunction(torch.autograd.Function):
    # Vocabulary blocks too, not only token chunks: a 16-bit head against a chunk would need the whole
    # weight in fp32 at once. One fp32 block exists at a time, and logsumexp runs online over blocks.
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index):
        N, V, H = hidden.shape[0], weight.shape[0], hidden.shape[1]
        keep = targets != ignore_index
        safe_y = torch.where(keep, targets, 0).long()
        chunks, blocks = _blocks(N, V, H)
        lse = _empty(N, torch.float32, hidden.device)
        z_y = torch.zeros(N, dtype=torch.float32, device=hidden.device)  # the target's logit
        for ts in chunks:
            h = hidden[ts].float()  # (C, H)
            m = torch.full((h.shape[0],), float("-inf"), device=h.device)  # running max
            s = torch.zeros(h.shape[0], device=h.device)  # running sum of exp(z - m)
            for vs in blocks:
                z = h @ weight[vs].float().T  # (C, Vb) fp32
                m_new = torch.maximum(m, z.amax(-1))
                s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
                m = m_new
                inside, col = _target_column(safe_y[ts], vs)
                z_y[ts] = torch.where(inside, z.gather(-1, col).squeeze(-1), z_y[ts])
            lse[ts] = m + s.log()
        ctx.save_for_backward(hidden, weight, safe_y, keep, lse)
        return torch.where(keep, z_y - lse, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp):
        hidden, weight, safe_y, keep, lse = ctx.saved_tensors
        N, V, H = hidden.shape[0], weight.shape[0], hidden.shape[1]
        need_dh, need_dw = ctx.needs_input_grad[:2]  # at least one, or autograd would not call backward
        g = torch.where(keep, grad_logp.float(), 0.0)
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None  # fp32 sums
        chunks, blocks = _blocks(N, V, H)
        for ts in chunks:
            h = hidden[ts].float()  # (C, H)
            for vs in blocks:
                w = weight[vs].float()  # (Vb, H)
                dz = torch.exp((h @ w.T).sub_(lse[ts, None])).mul_(-g[ts, None])  # -g * softmax, recomputed
                inside, col = _target_column(safe_y[ts], vs)
                dz.scatter_add_(-1, col, torch.where(inside, g[ts], 0.0)[:, None])  # true-class term in fp32
                if need_dh:
                    dh[ts].addmm_(dz, w)  # (C, H) += (C, Vb) @ (Vb, H)
                if need_dw:
                    dw[vs].addmm_(dz.T, h)  # (Vb, H) += (Vb, C) @ (C, H)
        return (dh.to(hidden.dtype) if need_dh else None, dw.to(weight.dtype) if need_dw else None, None, None)


def linear_token_logprobs_ref(hidden, weight, targets, ignore_index=-100):
    """hidden (N, H), weight (V, H), targets (N,) -> (N,) fp32; gradients accumulate in fp32."""
    return LinearTokenLogprobsRefFunction.apply(hidden, weight, targets, ignore_index)
