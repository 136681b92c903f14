"""token_logprobs (logits input): the chunked reference and the Triton kernel against float64.

Run: python -m pytest -q tests/test_logprobs.py
On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest.py) in fp32;
the bf16 tests need CUDA (-m gpu runs only those).
"""
import math
import subprocess
import sys

import pytest
import torch

import kernels
import kernels.logprobs_ref as logprobs_ref
from kernels import token_logprobs
from kernels.logprobs_ref import token_logprobs_eager

IMPLS = ["ref", pytest.param("triton", marks=pytest.mark.skipif(not kernels.triton_available(), reason="no triton"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every output buffer starts as NaN, so an element no kernel writes fails the comparison;
    small reference chunks, so the test sizes cross chunk borders."""
    monkeypatch.setattr(logprobs_ref, "POISON", True)
    monkeypatch.setattr(logprobs_ref, "CHUNK_ELEMENTS", 4096)


def make_case(N, V, seed, dtype=torch.float32, device="cpu", ignore_index=-100):
    """Fresh logits (N, V) as a strided view, targets with ignored rows and one confident row, and g."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(N, V + 7, generator=gen) * 3  # rows of V + 7: the (N, V) view below has row stride != V
    targets = torch.randint(0, V, (N,), generator=gen)
    if N > 1:
        base[1, 3 + targets[1]] = base[1].max() + 20  # p_y ~ 1: the true-class gradient pitfall
    targets[2::3] = ignore_index
    g = torch.randn(N, generator=gen)  # non-uniform upstream gradient, as DPO gives
    logits = base.to(device, dtype)[:, 3 : 3 + V]
    assert N == 1 or not logits.is_contiguous()  # (one row counts as contiguous)
    return logits, targets.to(device), g.to(device)


def run(impl, logits, targets, g, ignore_index=-100):
    """Forward and gradient w.r.t. the logits, through the public dispatch."""
    x = logits.detach().requires_grad_()
    out = token_logprobs(x, targets, ignore_index, impl=impl)
    out.backward(g)
    return out.detach(), x.grad


def oracle(logits, targets, g, ignore_index=-100):
    """log_softmax + gather in float64 on the same values."""
    x = logits.detach().double().requires_grad_()
    out = token_logprobs_eager(x, targets, ignore_index)
    out.backward(g.double())
    return out.detach(), x.grad


def check_fp32(out, grad, ref_out, ref_grad, V):
    assert out.dtype == torch.float32 and not out.isnan().any() and not grad.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 + 1e-6 * V**0.5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Parity grid (fp32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [5, 127, 1000, 4099])
@pytest.mark.parametrize("N", [1, 7, 64])
def test_matches_float64(impl, N, V):
    logits, targets, g = make_case(N, V, seed=1000 * N + V)
    out, grad = run(impl, logits, targets, g)
    ref_out, ref_grad = oracle(logits, targets, g)
    check_fp32(out, grad, ref_out, ref_grad, V)
    ignored = targets == -100
    assert (out[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_shifted_3d_logits_and_int32_targets(impl, monkeypatch):
    """DPO's shifted logits[:, :-1] (B, T, V) and input_ids[:, 1:]: strided views, never copied."""
    monkeypatch.setattr(logprobs_ref, "CHUNK_ELEMENTS", 2 * 300)  # the reference walks 2-row chunks
    gen = torch.Generator().manual_seed(7)
    B, T, V = 3, 9, 300
    full = (torch.randn(B, T + 1, V, generator=gen) * 2).requires_grad_()
    ids = torch.randint(0, V, (B, T + 1), generator=gen, dtype=torch.int32)
    ids[0, :4] = -1  # a prompt, with a custom ignore_index
    targets, g = ids[:, 1:], torch.randn(B, T, generator=gen)
    out = token_logprobs(full[:, :-1], targets, ignore_index=-1, impl=impl)
    out.backward(g)
    full64 = full.detach().double().requires_grad_()
    ref = token_logprobs_eager(full64[:, :-1], targets, ignore_index=-1)
    ref.backward(g.double())
    assert out.shape == (B, T)
    check_fp32(out, full.grad, ref.detach(), full64.grad, V)
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_empty(impl):
    logits, targets, g = make_case(5, 33, seed=3)
    out, grad = run(impl, logits, torch.full_like(targets, -100), g)
    assert (out == 0).all() and (grad == 0).all()
    out, grad = run(impl, logits[:0], targets[:0], g[:0])
    assert out.shape == (0,) and grad.shape == (0, 33)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_not_written_into_logits(impl):
    """Another op saved the same logits tensor; its gradient must not see ours (Liger #254)."""
    logits, targets, g = make_case(6, 50, seed=4)
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    before = x.detach().clone()
    for t, impl_ in ((x, impl), (x64, None)):
        z = t * 1.0
        lp = token_logprobs(z, targets, impl=impl_) if impl_ else token_logprobs_eager(z, targets)
        ((z.exp() * 0.1).sum() + (lp * g.to(t.dtype)).sum()).backward()  # exp() saved z
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Dispatch and errors


def test_bad_targets_raise():
    logits = torch.randn(4, 10)
    for bad in (10, -2):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            token_logprobs(logits, torch.tensor([0, 1, bad, -100]))
    with pytest.raises(ValueError, match="int32 or int64"):
        token_logprobs(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="does not match"):
        token_logprobs(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long), impl="cuda")


def test_dispatch_uses_reference_off_cuda(monkeypatch):
    logits, targets, _ = make_case(4, 20, seed=5)
    assert kernels._pick(None, logits) == "ref"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        token_logprobs(logits, targets, impl="triton")


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, kernels\n"
        "out = kernels.token_logprobs(torch.zeros(2, 4), torch.tensor([1, -100]))\n"
        "assert out.tolist() == [-torch.log(torch.tensor(4.0)).item(), 0.0]\n"
        "try:\n    kernels.token_logprobs(torch.zeros(2, 4), torch.tensor([1, 2]), impl='triton')\n"
        "except RuntimeError as e:\n    print('ok', e)\n"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr


@pytest.mark.skipif(not kernels.triton_available(), reason="no triton")
def test_poison_catches_an_unwritten_row():
    """The poison is live: a launch that skips the last row leaves NaN there, which the checks reject."""
    from kernels.logprobs import _logprobs_fwd_kernel, _settings

    logits, targets, _ = make_case(6, 40, seed=6)
    targets[-1] = 3
    logp, lse = logprobs_ref._empty(6, torch.float32, "cpu"), logprobs_ref._empty(6, torch.float32, "cpu")
    block, _ = _settings(40, logits.device)
    _logprobs_fwd_kernel[(5,)](logits, targets, logp, lse, 6, 0, logits.stride(0), 40, -100, BLOCK_V=block)
    assert logp[:5].isfinite().all() and logp[5].isnan()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logp.double(), token_logprobs_eager(logits.double(), targets))


# ---------------------------------------------------------------------------------------------
# bf16 on the GPU (Triton's CPU interpreter computes bf16 wrongly)


@pytest.mark.gpu
@pytest.mark.parametrize("N,V", [(37, 32000), (300, 152064), (5, 4099)])
def test_bf16_gpu(N, V):
    logits, targets, g = make_case(N, V, seed=N + V, dtype=torch.bfloat16, device="cuda")
    # Row 1 at p_y ~ 0.999, where rounding g * p_y to bf16 before subtracting g lost ~100% (Liger #1329).
    row, y1 = logits[1].double(), targets[1]
    others = torch.cat([row[:y1], row[y1 + 1 :]]).logsumexp(0)
    logits[1, y1] = (others + math.log(999)).to(torch.bfloat16)
    out, grad = run("triton", logits, targets, g)
    ref_out, ref_grad = oracle(logits, targets, g)  # float64 from the same bf16 values
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5 + 1e-6 * V**0.5)
    # one rounding of an fp32 value to bf16: within 2^-8 relative (RTNE); 2^-7 leaves margin
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2**-7, atol=1e-6)
    true_class = ref_grad[1, y1]  # ~ 1e-3 * g[1]
    assert abs(grad[1, y1].double() - true_class) <= 2**-7 * abs(true_class)
