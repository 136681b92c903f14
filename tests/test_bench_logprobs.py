"""Benchmarks of the log-prob kernels, opt in (each prints a table):

    python -m pytest -q -s -m bench tests/test_bench_logprobs.py    # CPU: chunked reference vs eager
    python -m bench.gpu --out=bench/gpu.md                  # GPU: Triton vs eager/compile/CE

The CPU benchmark measures peak memory with the torch profiler: `profile_memory=True` records every
allocation and free of torch's CPU allocator with its size and time; the running sum over the call
gives its peak. (tracemalloc and ru_maxrss do not see torch's allocations reliably: tracemalloc
only sees Python's allocator, and RSS keeps freed pages.) "Extra" is that peak minus the outputs
every implementation must return: logp (N floats), and in forward+backward the logits gradient.

Two tests run by default: the GPU script's table logic at tiny shapes on the CPU, and the claims the
README makes from the recorded H200 tables in bench/gpu.md. On a CUDA machine `-m bench` also runs
the GPU script itself and checks the same claims on its fresh tables.
"""
import os
import time

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from kernels.logprobs_ref import (linear_token_logprobs_eager, linear_token_logprobs_ref, token_logprobs_eager,
                                  token_logprobs_ref)


def peak_bytes(fn) -> int:
    """Peak bytes allocated by torch's CPU allocator during fn(), above what was live before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocs.append((event.start_time_ns, event.extra_fields.alloc_size))  # < 0 for a free
    live = peak = 0
    for _, size in sorted(allocs, key=lambda a: a[0]):
        live += size
        peak = max(peak, live)
    return peak


def median_ms(fns: dict, reps: int) -> dict:
    """Median wall time of each fn; the fns take turns so that machine noise hits all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def compare(impls: dict, inputs: list, targets, g, reps: int) -> list:
    """Rows (mode, impl, ms, extra MB, time ratio, memory ratio) for forward and forward+backward."""
    N = targets.shape[0]
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd(fn):
        with torch.no_grad():
            fn(*inputs, targets)

    def fwd_bwd(fn):
        fn(*leaves, targets).backward(g)
        for t in leaves:
            t.grad = None

    rows = []
    for mode, run, unavoidable in (("fwd", fwd, 4 * N), ("fwd+bwd", fwd_bwd, 4 * N + grad_bytes)):
        ms = median_ms({name: (lambda fn=fn: run(fn)) for name, fn in impls.items()}, reps)
        mb = {name: (peak_bytes(lambda fn=fn: run(fn)) - unavoidable) / 1e6 for name, fn in impls.items()}
        base = next(iter(impls))
        for name in impls:
            rows.append((mode, name, ms[name], mb[name], ms[name] / ms[base], mb[name] / mb[base]))
    return rows


def print_table(title, rows):
    print(f"\n{title}\n| mode | impl | ms (median) | extra peak MB | time vs eager | memory vs eager |")
    print("|---|---|---|---|---|---|")
    for mode, name, ms, mb, t, m in rows:
        print(f"| {mode} | {name} | {ms:.0f} | {mb:.1f} | {t:.2f}x | {m:.3f}x |")


@pytest.mark.bench
def test_cpu_chunked_vs_eager():
    """Goal: extra peak <= 1/4 of eager's, time <= 1.1x eager's, at N = 4096, V = 32000 fp32."""
    gen = torch.Generator().manual_seed(0)
    N, V = 4096, 32000
    logits = torch.randn(N, V, generator=gen) * 2
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::5] = -100
    g = torch.randn(N, generator=gen)
    # correctness before timing
    torch.testing.assert_close(token_logprobs_ref(logits, targets), token_logprobs_eager(logits, targets))
    threads = torch.get_num_threads()
    try:  # 1 thread too: the op-call cost of chunking (a thread-pool sync each) depends on the machine's load
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            rows = compare({"eager log_softmax+gather": token_logprobs_eager, "chunked ref": token_logprobs_ref},
                           [logits], targets, g, reps=5)
            print_table(f"CPU, logits input, N={N}, V={V}, fp32, {n} thread(s), "
                        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", rows)
            for mode, name, ms, mb, t, m in rows:
                if name == "chunked ref":
                    assert m <= 0.25, f"{mode}: chunked extra memory is {m:.2f}x eager's"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.bench
def test_cpu_linear_chunked_vs_eager():
    gen = torch.Generator().manual_seed(0)
    N, V, H = 4096, 32000, 128
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    g = torch.randn(N, generator=gen)
    torch.testing.assert_close(linear_token_logprobs_ref(hidden, weight, targets),
                               linear_token_logprobs_eager(hidden, weight, targets), rtol=1e-5, atol=1e-4)
    rows = compare({"matmul+eager": linear_token_logprobs_eager, "chunked ref": linear_token_logprobs_ref},
                   [hidden, weight], targets, g, reps=3)
    print_table(f"CPU, fused linear, N={N}, V={V}, H={H}, fp32", rows)


def test_gpu_bench_script_smoke(tmp_path):
    """`python -m bench.gpu --smoke`: tiny shapes on CPU, Triton interpreted, every row filled."""
    from bench import gpu as bench_gpu

    out = tmp_path / "gpu.md"
    bench_gpu.main([f"--out={out}", "--smoke"])  # torch.compile with the "eager" backend on CPU
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 16 ")]
    names = [r[2].strip() for r in rows]
    assert names == ["triton", "eager", "compiled", "cross_entropy", "ref (chunked torch)",
                     "triton fused", "matmul+eager", "chunked (cuBLAS + triton)", "matmul+compiled",
                     "ref (chunked torch)"]
    for r in rows:
        assert float(r[3]) < 1e-4  # max abs diff vs eager
        assert float(r[4]) > 0 and float(r[7]) > 0  # fwd ms, fwd+bwd ms


def fwd_bwd_ms(table: str) -> dict:
    """{(N, V, impl): fwd+bwd ms} from bench_gpu's markdown tables; skipped and OOM rows left out."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 10 and cells[0].isdigit() and cells[7].replace(".", "").isdigit():
            out[int(cells[0]), int(cells[1]), cells[2]] = float(cells[7])
    return out


def check_gpu_claims(table: str) -> None:
    """What README and bench/gpu.md say of the GPU tables: the logits kernel beats eager at every shape,
    and from hidden states the chunked path (the CUDA default) beats the fused kernel."""
    ms = fwd_bwd_ms(table)
    shapes = {(n, v) for n, v, _ in ms}
    assert shapes, "no timed rows"
    for n, v in shapes:
        if (n, v, "triton") in ms:
            assert ms[n, v, "triton"] < ms[n, v, "eager"], (n, v)
        if (n, v, "chunked (cuBLAS + triton)") in ms:
            assert ms[n, v, "chunked (cuBLAS + triton)"] < ms[n, v, "triton fused"], (n, v)


def test_recorded_gpu_tables_hold_the_claims():
    """bench/gpu.md, the H200 measurements the README quotes, still says what the README says."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu.md")
    with open(path) as f:
        table = f.read()
    ms = fwd_bwd_ms(table)
    assert {(n, v) for n, v, impl in ms if impl.startswith("chunked")} == {(4096, 32064), (4096, 152064),
                                                                          (16384, 32064), (16384, 152064)}
    check_gpu_claims(table)


@pytest.mark.bench
@pytest.mark.gpu
def test_gpu_tables(tmp_path):
    """On a CUDA machine `-m bench` also runs bench/gpu.py (~1-3 minutes), prints its tables and
    checks the claims made from them."""
    from bench import gpu as bench_gpu

    out = tmp_path / "gpu.md"
    bench_gpu.main([f"--out={out}"])
    table = out.read_text()
    print(table)
    check_gpu_claims(table)
