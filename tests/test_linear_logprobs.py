"""linear_token_logprobs (hidden states + lm_head weight): reference and Triton against float64,
and a few DPO steps of a tiny model that must give the same losses with either implementation.

Run: python -m pytest -q tests/test_linear_logprobs.py
On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py) in fp32.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import kernels
import kernels.logprobs_ref as logprobs_ref
from kernels import linear_token_logprobs, token_logprobs
from kernels.logprobs_ref import linear_token_logprobs_eager

_NO_TRITON = pytest.mark.skipif(not kernels.triton_available(), reason="no triton")
IMPLS = ["ref", pytest.param("triton", marks=_NO_TRITON), pytest.param("chunked", marks=_NO_TRITON)]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output buffer starts as NaN, so an element no kernel writes fails the comparison;
    small reference chunks, so the test sizes cross chunk borders."""
    monkeypatch.setattr(logprobs_ref, "POISON", True)
    monkeypatch.setattr(logprobs_ref, "CHUNK_ELEMENTS", 4096)
    if kernels.triton_available():
        import kernels.chunked_logprobs as chunked_logprobs

        monkeypatch.setattr(chunked_logprobs, "CPU_CHUNK_ELEMENTS", 2048)


def make_case(N, V, H, seed, dtype=torch.float32, device="cpu"):
    """Fresh hidden (N, H) as a strided view, weight (V, H) as a transposed view, targets with ignored
    rows and one confident row, and a non-uniform upstream gradient g."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H + 5, generator=gen)  # the (N, H) view below has row stride H + 5
    weight = (torch.randn(H, V, generator=gen) / H**0.5 * 2).T  # strides (1, V)
    targets = torch.randint(0, V, (N,), generator=gen)
    if N > 1:  # row 1 points along its target's weight row: p_y ~ 1
        hidden[1, 2 : 2 + H] = weight[targets[1]] * (25 / weight[targets[1]].norm() ** 2)
    targets[2::3] = -100
    g = torch.randn(N, generator=gen)
    return hidden.to(device, dtype)[:, 2 : 2 + H], weight.to(device, dtype), targets.to(device), g.to(device)


def run(impl, hidden, weight, targets, g):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = linear_token_logprobs(h, w, targets, impl=impl)
    out.backward(g)
    return out.detach(), h.grad, w.grad


def oracle(hidden, weight, targets, g):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    out = linear_token_logprobs_eager(h, w, targets)
    out.backward(g.double())
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("H", [16, 48])
@pytest.mark.parametrize("V", [5, 127, 1000, 4099])
@pytest.mark.parametrize("N", [1, 7, 64])
def test_matches_float64(impl, N, V, H):
    hidden, weight, targets, g = make_case(N, V, H, seed=N * 10007 + V * 101 + H)
    out, dh, dw = run(impl, hidden, weight, targets, g)
    ref_out, ref_dh, ref_dw = oracle(hidden, weight, targets, g)
    assert out.dtype == torch.float32
    for got in (out, dh, dw):
        assert not got.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 + 1e-6 * V**0.5)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-5)
    ignored = targets == -100
    assert (out[ignored] == 0).all() and (dh[ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_empty_and_frozen_weight(impl):
    hidden, weight, targets, g = make_case(9, 70, 16, seed=11)
    out, dh, dw = run(impl, hidden, weight, torch.full_like(targets, -100), g)
    assert (out == 0).all() and (dh == 0).all() and (dw == 0).all()
    out, dh, dw = run(impl, hidden[:0], weight, targets[:0], g[:0])
    assert out.shape == (0,) and dh.shape == (0, 16) and (dw == 0).all()
    # only one input wants a gradient: a frozen head (LoRA), or frozen hidden states
    _, ref_dh, ref_dw = oracle(hidden, weight, targets, g)
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    linear_token_logprobs(h, weight, targets, impl=impl).backward(g)
    linear_token_logprobs(hidden, w, targets, impl=impl).backward(g)
    torch.testing.assert_close(h.grad.double(), ref_dh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_dw, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    h, w = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_token_logprobs(h, w, torch.tensor([0, 10, -100]))
    with pytest.raises(ValueError, match=r"hidden \(N, H\)"):
        linear_token_logprobs(h, torch.randn(10, 9), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dtype"):
        linear_token_logprobs(h, w.double(), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# A few DPO steps: same losses whichever implementation scores the tokens


class TinyLM(torch.nn.Module):
    def __init__(self, V=53, D=16):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed_tokens(ids)))  # (B, T, D)


def sequence_logps(model, ids, targets, impl, fused):
    """Sum of per-token log-probs of each sequence: ids (B, T), targets (B, T - 1) with -100 on prompt/pad."""
    h = model.hidden(ids)[:, :-1]  # (B, T-1, D): position t predicts token t + 1
    if fused:
        D = h.shape[-1]
        logps = linear_token_logprobs(h.reshape(-1, D), model.lm_head.weight, targets.reshape(-1), impl=impl)
        return logps.view(targets.shape).sum(-1)
    return token_logprobs(model.lm_head(h), targets, impl=impl).sum(-1)


def dpo_losses(impl, fused, steps=4, beta=0.5):
    gen = torch.Generator().manual_seed(0)
    policy = TinyLM()
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ids = torch.randint(0, 53, (8, 12), generator=gen)  # rows 0-3 chosen, 4-7 rejected
    ids[4:, :5] = ids[:4, :5]  # shared prompts
    targets = ids[:, 1:].clone()
    targets[:, :4] = -100  # prompt tokens are not scored
    targets[[1, 6], -3:] = -100  # right padding
    with torch.no_grad():
        ref_logps = sequence_logps(reference, ids, targets, impl, fused)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logps = sequence_logps(policy, ids, targets, impl, fused)
        margin = (logps[:4] - ref_logps[:4]) - (logps[4:] - ref_logps[4:])
        loss = -F.logsigmoid(beta * margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not kernels.triton_available(), reason="no triton")
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_dpo_steps_same_losses(fused):
    ref, tri = dpo_losses("ref", fused), dpo_losses("triton", fused)
    assert ref[-1] < ref[0] - 0.05  # it trains
    torch.testing.assert_close(torch.tensor(tri), torch.tensor(ref), rtol=0, atol=1e-5)
    if fused:
        torch.testing.assert_close(torch.tensor(dpo_losses("chunked", fused)), torch.tensor(ref), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bf16 on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "chunked"])
@pytest.mark.parametrize("N,V,H", [(300, 32000, 256), (64, 4099, 48), (3000, 152064, 64)])
def test_bf16_gpu(N, V, H, impl):
    """CCE's rule: our error vs float64 is no worse than torch's own bf16 eager path plus a small tol.
    (3000 x 152064 makes the chunked version take two chunks.)"""
    hidden, weight, targets, g = make_case(N, V, H, seed=N + V, dtype=torch.bfloat16, device="cuda")
    ours = run(impl, hidden, weight, targets, g)
    eager = _eager_bf16(hidden, weight, targets, g)
    exact = oracle(hidden, weight, targets, g)
    if impl == "triton":  # fp32 logits from bf16 operands; "chunked" rounds them to bf16, as eager does
        torch.testing.assert_close(ours[0].double(), exact[0], rtol=1e-5, atol=1e-4)
    for got, base, ref in zip(ours, eager, exact):
        assert got.dtype == (torch.float32 if got is ours[0] else torch.bfloat16)
        scale = ref.abs().max()
        assert (got.double() - ref).abs().max() <= (base.double() - ref).abs().max() + 2**-8 * scale


@pytest.mark.gpu
def test_chunked_under_autocast_gpu():
    """DPO on CUDA runs under bf16 autocast with fp32 weights: the chunked products run in bf16 in the
    forward and, recomputed, in the backward too (custom_bwd), so forward and backward agree."""
    hidden, weight, targets, g = make_case(500, 32000, 256, seed=5, device="cuda")  # fp32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = run("chunked", hidden, weight, targets, g)
    eager = _eager_bf16(hidden.bfloat16(), weight.bfloat16(), targets, g)  # what autocast computes
    exact = oracle(hidden, weight, targets, g)
    for got, base, ref in zip(ours, eager, exact):
        assert got.dtype == torch.float32
        scale = ref.abs().max()
        assert (got.double() - ref).abs().max() <= (base.double() - ref).abs().max() + 2**-8 * scale


def _eager_bf16(hidden, weight, targets, g):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    out = linear_token_logprobs_eager(h, w, targets)  # bf16 matmul, fp32 log_softmax
    out.backward(g)
    return out.detach(), h.grad, w.grad
