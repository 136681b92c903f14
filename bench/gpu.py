"""GPU benchmark of the log-prob kernels against eager, torch.compile and F.cross_entropy.

    python -m bench.gpu --out=bench/gpu.md            # on a CUDA machine, ~3-5 minutes
    python -m bench.gpu --out=/tmp/smoke.md --smoke   # tiny shapes (no GPU: Triton interpreted, fp32)

Logits input (bf16, N in {4096, 16384}, V in {32064, 152064}) and from hidden states (H = 4096, same
N and V: the fused kernel, the chunked cuBLAS + Triton path, matmul + eager/compiled). For each case:
correctness against eager first, then forward and forward+backward timed with CUDA events (median
of --reps after warm-up), with a random non-uniform upstream gradient. Reported: ms; for logits
input the achieved bandwidth on the minimum traffic (forward reads the logits once: N*V*b bytes;
forward+backward 3*N*V*b) as GB/s and as a share of a measured device-to-device copy; from hidden
states TFLOPS on the useful 2NHV (fwd) / 6NHV (fwd+bwd) flops (the fused and chunked paths do 8NHV:
they recompute the logits in backward); and the extra peak memory beyond the inputs, the output and
the input gradients every provider must produce. A case that runs out of memory, or that would
start after --budget_s, is skipped with a note.
"""
import argparse
import os
import statistics
import time


def _timer(device):
    """-> run(fn, reps) -> median ms. CUDA events on the GPU, perf_counter on the CPU."""
    import torch

    def run(fn, reps):
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return run


def _copy_bandwidth(device, timer) -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write counted), the attainable ceiling."""
    import torch

    n = (1 << 30) // 4 if device.type == "cuda" else 1 << 20
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    ms = timer(lambda: dst.copy_(src), 10)
    return 2 * n * 4 / ms / 1e6


def _measure(fn, device, timer, reps, unavoidable_bytes):
    """(median ms, extra peak MB or None); the first call warms up (and compiles)."""
    import torch

    fn()
    mem = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base - unavoidable_bytes) / 1e6
    return timer(fn, reps), mem


def _providers(linear: bool, compile_backend):
    """name -> fn(*inputs, targets); ours first, eager second (the others are checked against it)."""
    import torch
    import torch.nn.functional as F

    from kernels import linear_token_logprobs, token_logprobs
    from kernels import logprobs_ref as ref

    if linear:
        providers = {"triton fused": lambda h, w, y: linear_token_logprobs(h, w, y, impl="triton"),
                     "matmul+eager": ref.linear_token_logprobs_eager,
                     "chunked (cuBLAS + triton)": lambda h, w, y: linear_token_logprobs(h, w, y, impl="chunked"),
                     "matmul+compiled": ref.linear_token_logprobs_eager}
        if not torch.cuda.is_available():  # the CPU path; on the GPU its fp32 GEMMs would only eat the time budget
            providers["ref (chunked torch)"] = ref.linear_token_logprobs_ref
    else:
        providers = {"triton": lambda x, y: token_logprobs(x, y, impl="triton"),
                     "eager": ref.token_logprobs_eager,
                     "compiled": ref.token_logprobs_eager,
                     "cross_entropy": lambda x, y: -F.cross_entropy(x.float(), y, reduction="none"),
                     "ref (chunked torch)": ref.token_logprobs_ref}
    compiled = "matmul+compiled" if linear else "compiled"
    if compile_backend is None:
        del providers[compiled]
    else:
        providers[compiled] = torch.compile(providers[compiled], dynamic=True, backend=compile_backend)
    return providers


def bench_case(linear, providers, N, V, H, dtype, device, reps, timer, copy_gbs):
    """Table rows for one shape: each provider's output compared with eager's, then timed and measured."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    y = torch.randint(0, V, (N,), device=device, generator=gen)
    y[::5] = -100  # some tokens not scored
    g = torch.randn(N, device=device, generator=gen)  # non-uniform upstream gradient, as DPO gives
    if linear:
        inputs = [torch.randn(N, H, device=device, generator=gen).to(dtype),
                  (torch.randn(V, H, device=device, generator=gen) / H**0.5).to(dtype)]
    else:
        inputs = [(torch.randn(N, V, device=device, generator=gen) * 2).to(dtype)]
    b = inputs[0].element_size()
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs)
    leaves = [t.detach().requires_grad_() for t in inputs]

    outs = {}  # (N,) fp32 each: cheap to keep
    for name, fn in providers.items():
        try:
            with torch.no_grad():
                outs[name] = fn(*inputs, y)
        except torch.cuda.OutOfMemoryError:
            outs[name] = None
            torch.cuda.empty_cache()
    eager = outs["matmul+eager" if linear else "eager"]

    table = []
    for name, fn in providers.items():
        def fwd():
            with torch.no_grad():
                fn(*inputs, y)

        def fwd_bwd():
            fn(*leaves, y).backward(g)
            for t in leaves:  # freed here, so the next call's peak starts without them
                t.grad = None

        try:
            if outs[name] is None:
                raise torch.cuda.OutOfMemoryError
            diff = "n/a" if eager is None else f"{(outs[name] - eager).abs().max().item():.1e}"
            ms_f, mem_f = _measure(fwd, device, timer, reps, N * 4)
            ms_b, mem_b = _measure(fwd_bwd, device, timer, reps, N * 4 + grad_bytes)
        except torch.cuda.OutOfMemoryError:
            table.append(f"| {N} | {V} | {name} | OOM, skipped | | | | | | |")
            torch.cuda.empty_cache()
            continue
        if linear:
            speed_f = f"{2 * N * H * V / ms_f / 1e9:.0f}"
            speed_b = f"{6 * N * H * V / ms_b / 1e9:.0f}"
        else:
            speed_f = f"{N * V * b / ms_f / 1e6:.0f} ({N * V * b / ms_f / 1e6 / copy_gbs:.0%})"
            speed_b = f"{3 * N * V * b / ms_b / 1e6:.0f} ({3 * N * V * b / ms_b / 1e6 / copy_gbs:.0%})"
        mb = lambda m: "n/a" if m is None else f"{m:.0f}"  # noqa: E731
        table.append(f"| {N} | {V} | {name} | {diff} | {ms_f:.3f} | {speed_f} | {mb(mem_f)} | {ms_b:.3f} | "
                     f"{speed_b} | {mb(mem_b)} |")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file for the tables")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (without a GPU: Triton interpreted, fp32)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions (median)")
    parser.add_argument("--budget_s", type=float, default=270, help="skip cases that would start after this")
    parser.add_argument("--no_compile", action="store_true", help="leave out the torch.compile baselines")
    parser.add_argument("--linear_only", action="store_true", help="only the fused linear table")
    args = parser.parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        raise SystemExit("bench.gpu needs a CUDA device (or --smoke for tiny shapes on the CPU)")
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel modules are first imported
    import triton

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter computes bf16 wrongly
    backend = "inductor" if on_gpu else "eager"  # eager: no C++ compiler needed on the CPU
    reps = 1 if args.smoke else args.reps
    Ns, Vs, H = ([16], [300], 32) if args.smoke else ([4096, 16384], [32064, 152064], 4096)
    timer = _timer(device)
    copy_gbs = _copy_bandwidth(device, timer)
    name = (torch.cuda.get_device_name(device) if on_gpu else "cpu") + (" (smoke)" if args.smoke else "")
    header = [f"# bench/gpu.py on {name}", "",
              f"torch {torch.__version__}, triton {triton.__version__}, {dtype}, median of {reps}; device-to-device "
              f"copy {copy_gbs:.0f} GB/s. Extra MB = peak beyond inputs, output and input gradients.", ""]
    tables = {False: [], True: []}  # linear? -> rows
    backend = None if args.no_compile else backend
    providers = {linear: _providers(linear, backend) for linear in (False, True)}  # compiled once, dynamic shapes
    started = time.time()
    for N in Ns:  # small N of both kinds first, so a short budget still yields both tables
        for linear in (True,) if args.linear_only else (False, True):
            for V in Vs:
                if time.time() - started > args.budget_s:
                    tables[linear].append(f"| {N} | {V} | skipped: {args.budget_s:.0f} s budget spent | | | | | | | |")
                    continue
                tables[linear] += bench_case(linear, providers[linear], N, V, H, dtype, device, reps, timer, copy_gbs)
                _write(args.out, header, tables, H)  # after every case: a run cut short keeps its results
    header[2] += f" Total wall time {time.time() - started:.0f} s."
    print(_write(args.out, header, tables, H))


def _write(path, header, tables, H) -> str:
    lines = list(header)
    for linear, rows in tables.items():
        speed = "TFLOPS (2NHV / 6NHV)" if linear else "GB/s (share of copy)"
        lines += [f"## {'fused linear, H = %d' % H if linear else 'logits input'}", "",
                  f"| N | V | impl | max abs diff vs eager | fwd ms | fwd {speed} | fwd extra MB | fwd+bwd ms "
                  f"| fwd+bwd {speed} | fwd+bwd extra MB |", "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)

if __name__ == "__main__":
    main()
