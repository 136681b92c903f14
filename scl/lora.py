"""LoRA by hand (Hu et al. 2021), as the paper's DPO uses it.

    y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ        A: (r, in) kaiming-uniform,  B: (out, r) zeros

B = 0: the first DPO step sees policy == reference (the frozen weights, scored before the adapters
exist). The paper: r 8, α 32, dropout 0.05 on the LLM's q/k/v only, never on the vision tower, whose
layers have the same names (LLaVA's own code adapted it by mistake).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """nn.Linear plus a low-rank update; `weight`/`bias` stay its own parameters, so their names do not change."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) or None: the same Parameters
        # fp32 adapters even on a bf16 model: they are tiny, and AdamW's updates would round away in bf16.
        kw = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        # x·Aᵀ in x's dtype, then its r columns promoted: an fp32 x would keep an fp32 copy of every
        # adapted layer's input for backward. The price: A's gradient comes out of a bf16 product.
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype)).float()  # (..., r) fp32
        return y + (F.linear(a, self.lora_B) * self.scale).to(y.dtype)  # (..., out) in y's dtype

    def merged_weight(self):
        """W + (α/r)·B·A, summed in fp32 and rounded once to the weight's dtype. Footgun: a merged bf16
        model still matches its adapters only to bf16 precision."""
        delta = (self.lora_B @ self.lora_A) * self.scale  # (out, in)
        return (self.weight.float() + delta).to(self.weight.dtype)


def _lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(model, r: int = 8, alpha: float = 32, dropout: float = 0.05,
             targets=("q_proj", "k_proj", "v_proj")) -> list:
    """Freeze the model and wrap the LLM's linear layers named in `targets` -> the adapters, the only trainable."""
    if _lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA adapters")
    model.requires_grad_(False)
    llm = model.language_model  # the vision tower and projector are never adapted
    names = [n for n, m in llm.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear named {targets} in model.language_model")
    for n in names:
        base = llm.get_submodule(n)
        # Footgun: a new module starts in train mode; follow the model's mode so an eval-mode model
        # (load_vlm returns one) does not get live dropout in its adapters.
        llm.set_submodule(n, LoRALinear(base, r, alpha, dropout).train(base.training))
    return lora_parameters(model)


def lora_parameters(model) -> list:
    """The adapter tensors (lora_A, lora_B of every LoRALinear), in module order."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A, m.lora_B)]


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight and put a plain nn.Linear back, in place: the keys save_vlm knows."""
    for name, m in _lora_modules(model):
        lin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")  # its tensors are set below
        lin.weight = nn.Parameter(m.merged_weight(), requires_grad=m.weight.requires_grad)
        lin.bias = m.bias  # the same Parameter, or None
        model.set_submodule(name, lin)
    return model
