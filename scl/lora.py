"""LoRA by hand (Hu et al. 2021), as the paper's DPO uses it.

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ        A: (r, in) kaiming-uniform,  B: (out, r) zeros

B = 0 makes the adapted model start exactly at the base model, so the first DPO step sees policy ==
reference. The paper (ms-swift defaults) puts r = 8, α = 32, dropout 0.05 on the LLM's q/k/v projections
and nowhere else — in particular not on the vision tower, whose attention layers have the same names
(LLaVA's own find_all_linear_names adapted the tower by mistake). With adapters the reference model is free: the
same weights with the adapters switched off (`lora_disabled`). `merge_lora` folds B·A into the weight and
puts plain nn.Linear modules back, so the state dict has the base model's names and save_vlm writes a
checkpoint any LLaVA loader reads.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update. Keeps `weight`/`bias` as its own (frozen) parameters, so the
    base names (`...q_proj.weight`) do not change; the adapter adds `...q_proj.lora_A` / `.lora_B`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter object: no copy
        self.bias = base.bias  # (out,) or None
        # Adapters live in fp32 even on a bf16 model: they are tiny, and AdamW updates at lr 5e-5 would
        # round away in bf16.
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False inside lora_disabled(): the frozen reference model

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # x·Aᵀ runs in x's dtype (the matmul accumulates in fp32) and its r columns are then promoted: casting
        # x to fp32 instead would keep an fp32 copy of each adapted layer's input for backward, three per
        # decoder layer, more memory than the bf16 activations themselves. The price: A's gradient comes out
        # of a bf16 product (rounded once, ~3 significant digits, before fp32 accumulation and AdamW's
        # normalisation). On an fp32 model both ways are the same computation.
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype)).float()  # (..., r) fp32
        return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)  # (..., out) in y's dtype

    def merged_weight(self):
        """W + (α/r)·B·A, in the weight's dtype. The sum is done in fp32 and rounded once: rounding B·A to
        bf16 first and adding in bf16 would round twice. Footgun: a bf16 weight still loses every part of
        the update below half a unit in its last place, so a merged bf16 model matches its adapters only to
        bf16 precision."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _set_child(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_lora(model, r: int = 8, alpha: float = 32, dropout: float = 0.05,
             targets=("q_proj", "k_proj", "v_proj")) -> list:
    """Wrap the LLM's linear layers named in `targets` (language_model.* only) with LoRA.

    Freezes every parameter of the model first, so after this call the adapters are the only trainable
    tensors; returns them (the list to give the optimizer).
    """
    if _lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    llm = model.language_model  # the vision tower and projector are never adapted
    names = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear named {targets} in model.language_model")
    for n in names:
        base = llm.get_submodule(n)
        # Footgun: a new module starts in train mode; follow the model's mode so an eval-mode model
        # (load_vlm returns one) does not get live dropout in its adapters.
        _set_child(llm, n, LoRALinear(base, r, alpha, dropout).train(base.training))
    return lora_parameters(model)


def lora_parameters(model) -> list:
    """The adapter tensors (lora_A, lora_B of every LoRALinear), in module order."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model) -> dict:
    """Only the adapter entries of model.state_dict() (what a LoRA checkpoint needs to save)."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in ("lora_A", "lora_B")}


@contextmanager
def lora_disabled(model):
    """Run the model as its frozen base: the DPO reference. Restores the previous state."""
    mods = [m for _, m in _lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight and put a plain nn.Linear back (in place; returns the model).

    The new module holds the merged weight under the same name, so model.state_dict() has exactly the
    keys of the model before add_lora. Its parameters keep the requires_grad of the frozen base.
    """
    for name, m in _lora_modules(model):
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                        device=m.weight.device, dtype=m.weight.dtype)
        lin.weight.copy_(m.merged_weight())
        lin.weight.requires_grad_(m.weight.requires_grad)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
            lin.bias.requires_grad_(m.bias.requires_grad)
        _set_child(model, name, lin)
    return model
