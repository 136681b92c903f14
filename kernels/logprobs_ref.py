"""Per-token log-probabilities in plain PyTorch: the test oracle, the benchmark baseline, the CPU path.

    logp[n] = z[n, y_n] - logsumexp_v z[n, v]          (0 where y_n == ignore_index)

DPO scores a response by summing these over its tokens. With an upstream gradient
g[n] (non-uniform in DPO: each sequence's tokens get that pair's sigmoid weight) the gradient is

    dz[n, v] = g[n] * (onehot(y_n)[v] - softmax(z[n])[v]),  softmax(z[n])[v] = exp(z[n, v] - lse[n])

so the backward can recompute softmax from the logits instead of keeping an (N, V) tensor. (The
Triton kernels keep lse, N floats, and recompute softmax as exp(z - lse); here torch.softmax, one
fused op per chunk, does the same work.)

Three versions, each with the signature of a Triton kernel in `logprobs.py` / `linear_logprobs.py`:

- `token_logprobs_eager`: `log_softmax` + `gather`, the textbook line and the oracle of the tests
  (it computes in float64 when given float64).
- `token_logprobs_ref`: the same numbers, chunked over rows, as an autograd.Function.
- `linear_token_logprobs_ref`: from hidden states and the lm_head weight, chunked over tokens and
  over blocks of the vocabulary (online logsumexp), so neither the (N, V) logits nor an fp32 copy of
  a 16-bit weight ever exists whole.

Memory. Eager `log_softmax` writes an (N, V) fp32 tensor and keeps it for backward; backward then
builds a zero-filled (N, V) tensor for gather's gradient before log_softmax's backward writes the
logits gradient: two (N, V) tensors beyond the unavoidable ones (the logits and their gradient;
at N = 4096, V = 32000 fp32 each is 0.5 GB). The chunked version keeps nothing of size V and works
on one chunk of CHUNK_ELEMENTS floats at a time; its backward writes dz into the gradient buffer.

Time. Per chunk the forward runs eager's fused log_softmax kernel and the backward its fused softmax
plus one multiply into the gradient, so the chunked version moves less memory than eager (which
also writes and re-reads log_softmax and a zero-filled gather gradient). The catch is the number of
op calls: each large op is one sync of torch's intra-op thread pool, which costs milliseconds on a
busy machine. 16 MiB chunks keep that to ~100 calls at N = 4096, V = 32000 while a chunk stays ~3%
of the logits (tests/test_bench_logprobs.py measures both).
"""
import torch
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB fp32); why this size: see the module docstring

# Debug switch, off in normal use: fill every output buffer of the reference and of the Triton
# launchers with NaN when it is allocated, so an element nobody writes shows up as NaN instead of
# as stale memory that may hold the right answer from an earlier call. The tests turn it on.
POISON = False


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


# ---------------------------------------------------------------------------------------------
# Logits input, chunked over rows


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (B, T, V), a view where possible: a shifted logits[:, :-1] stays a view."""
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.flatten(0, -3) if x.dim() > 3 else x


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
            # for p_y -> 1 the bf16 difference of two rounded numbers is pure noise (Liger #1329).
            dz.scatter_add_(-1, safe_y[b, ts, None], g[b, ts, None])
            if dz.dtype != grad.dtype:
                grad[b, ts] = dz
        return grad.view(logits.shape), None, None


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token log-probabilities, chunked (bounded extra memory).

    Args:
        logits: (N, V) or (B, T, V) float, any strides (e.g. the shifted logits[:, :-1]).
        targets: (N,) or (B, T) integer token ids; `ignore_index` marks tokens not scored.
    Returns:
        (N,) or (B, T) fp32: log softmax(logits)[target], 0 at ignored tokens (with 0 gradient).
    """
    return TokenLogprobsRefFunction.apply(logits, targets, ignore_index)


# ---------------------------------------------------------------------------------------------
# Hidden states + lm_head weight, chunked over tokens and vocabulary (no (N, V) logits, no fp32 weight copy)


def _blocks(N: int, V: int, H: int):
    """Token chunks and vocabulary blocks for the hidden-state version: a block of Vb weight rows holds
    about CHUNK_ELEMENTS numbers once cast to fp32, a chunk of C tokens gives C x Vb <= CHUNK_ELEMENTS logits."""
    rows = max(1, min(V, CHUNK_ELEMENTS // max(H, 1)))  # Vb
    tokens = max(1, CHUNK_ELEMENTS // rows)  # C
    return ([slice(t, min(t + tokens, N)) for t in range(0, N, tokens)],
            [slice(v, min(v + rows, V)) for v in range(0, V, rows)])


def _target_column(safe_y, vs):
    """Which rows' target falls in vocabulary block vs, and its column there (clamped where it does not)."""
    inside = (safe_y >= vs.start) & (safe_y < vs.stop)
    return inside, (safe_y - vs.start).clamp(0, vs.stop - vs.start - 1)[:, None]


class LinearTokenLogprobsRefFunction(torch.autograd.Function):
    # Blocks of the vocabulary, not only chunks of tokens: with a 16-bit lm_head (bf16 models) a chunk of
    # tokens against the whole (V, H) weight would need the weight in fp32 at once (622 MB for a
    # 152000 x 1024 head) and read it again for every chunk. Here one fp32 block of the weight exists at a
    # time, it is read once per token chunk (a DPO batch is one chunk), and logsumexp runs online over blocks.
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
        need_dh, need_dw = ctx.needs_input_grad[:2]
        g = torch.where(keep, grad_logp.float(), 0.0)
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None  # fp32 sums
        chunks, blocks = _blocks(N, V, H)
        for ts in chunks if (need_dh or need_dw) else []:
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
    """Per-token log-probabilities of `hidden @ weight.T`, chunked over tokens and vocabulary blocks.

    Args:
        hidden: (N, H) float hidden states (after the final norm).
        weight: (V, H) lm_head weight.
        targets: (N,) integer token ids; `ignore_index` marks tokens not scored.
    Returns:
        (N,) fp32; gradients for hidden and weight are accumulated in fp32.
    """
    return LinearTokenLogprobsRefFunction.apply(hidden, weight, targets, ignore_index)
