"""Per-token log-probabilities for DPO scoring: the one entry point the project calls.

`impl=None` runs Triton on CUDA tensors (when triton imports) and the chunked PyTorch reference
elsewhere; Triton on CPU tensors needs TRITON_INTERPRET=1 (tests/conftest.py sets it). Reading order:
logprobs_ref.py, logprobs.py, linear_logprobs.py, chunked_logprobs.py.
"""
import functools

import torch

from kernels.logprobs_ref import LinearTokenLogprobsRefFunction, token_logprobs_ref

__all__ = ["token_logprobs", "linear_token_logprobs"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # not installed (macOS, Windows) or broken
        return False
    return True


def _pick(impl, tensor: torch.Tensor, allowed=("ref", "triton"), gpu_default="triton") -> str:
    if impl is None:
        return gpu_default if tensor.is_cuda and triton_available() else "ref"
    if impl not in allowed:
        raise ValueError(f"impl must be None or one of {allowed}, got {impl!r}")
    if impl != "ref" and not triton_available():
        raise RuntimeError(f"impl={impl!r} needs the triton package, which cannot be imported here; use impl='ref'")
    return impl


def _check_targets(targets: torch.Tensor, batch_shape, V: int, ignore_index: int) -> None:
    """Host check (one device sync): a bad target would make a kernel read out of bounds."""
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if tuple(targets.shape) != tuple(batch_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match {tuple(batch_shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        first = targets[bad][0].item()
        raise ValueError(f"target id {first} is outside the vocabulary [0, {V}) and is not ignore_index={ignore_index}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, impl=None) -> torch.Tensor:
    """logits (N, V) or (B, T, V), any row strides -> log softmax(logits)[target] (N,) or (B, T) fp32;
    `ignore_index` tokens give 0 and 0 gradient."""
    if not logits.is_floating_point() or logits.dim() < 2:
        raise ValueError(f"logits must be a float tensor (..., V), got {logits.dtype} {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    if _pick(impl, logits) == "triton":
        from kernels.logprobs import LogprobsFunction
        return LogprobsFunction.apply(logits, targets, ignore_index)
    return token_logprobs_ref(logits, targets, ignore_index)


def linear_token_logprobs(hidden, weight, targets, ignore_index: int = -100, impl=None) -> torch.Tensor:
    """hidden (N, H), lm_head weight (V, H) -> log softmax(hidden @ weight.T)[target] (N,) fp32, never
    holding the whole (N, V) logits. impl: None ("chunked" on CUDA, else "ref"), "ref", "chunked" (cuBLAS
    and the Triton logits kernel per token chunk: the fastest) or "triton" (fused: the least memory)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden and weight must share a float dtype and device, got {hidden.dtype}/{weight.dtype}")
    _check_targets(targets, hidden.shape[:1], weight.shape[0], ignore_index)
    impl = _pick(impl, hidden, ("ref", "triton", "chunked"), gpu_default="chunked")  # fastest (bench/gpu.md)
    if impl == "triton":
        from kernels.linear_logprobs import LinearLogprobsFunction as fn
    elif impl == "chunked":
        from kernels.chunked_logprobs import ChunkedLinearLogprobsFunction as fn
    else:
        fn = LinearTokenLogprobsRefFunction
    return fn.apply(hidden, weight, targets, ignore_index)
