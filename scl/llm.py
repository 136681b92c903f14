"""The decoder LLM: Llama and Qwen2 (RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention).

Module names mirror transformers' LlamaForCausalLM, so loading is a name map. Two KV caches: a list of
(k, v) per layer returns new tensors, so gradients flow through a cached prefix (DPO prefix sharing);
`KVCache` is preallocated and written in place, for generation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scl.config import TextConfig

KV = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Footgun: the mean square must be taken in fp32 (bf16 squares lose the small components);
        # the weight multiplies after casting back, as in transformers, or bf16 logits drift.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one kernel; bit-identical in fp32
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin, (B, 1, T, Dh) each (1: broadcast over heads), in fp32, then cast. With rotate-half's
    minus folded into the table, (-sin, sin), the rotation x * cos + (-x2, x1) * sin is one `roll`, bit-identical."""
    freqs = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, Dh/2)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by position."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin  # roll(x) = (x2, x1)


class KVCache:
    """Per layer (B, H_kv, max_len, Dh) keys and values; the model advances `length` after the last layer."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        # empty, not zeros: only positions < length are ever read
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length, self.max_len = 0, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KV:
        T, end = k.shape[2], self.length + k.shape[2]
        self.k[layer].narrow(2, self.length, T).copy_(k)
        self.v[layer].narrow(2, self.length, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)  # (B, H_kv, S, Dh)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, qkv_bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        # Llama's attention_bias covers o_proj too; Qwen2 never has an o_proj bias
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=qkv_bias and cfg.model_type == "llama")

    def forward(self, x, cos, sin, mask, past: KV | KVCache | None, last_only: bool = False):
        """-> (output (B, T, D), or (B, 1, D) for the last position only; this layer's (k, v) for S positions)."""
        B, T, _ = x.shape
        rep, Dh = self.n_head // self.n_kv, self.head_dim
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, Dh).transpose(1, 2), cos, sin)  # (B, H_kv, T, Dh)
        v = self.v_proj(x).view(B, T, self.n_kv, Dh).transpose(1, 2)
        if isinstance(past, KVCache):
            k, v = past.update(self.layer_idx, k, v)  # (B, H_kv, S, Dh), written in place
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, H_kv, S, Dh): new tensors
        if last_only and T > 1:  # every position's keys/values, but only the last one's query
            x, cos, sin, T = x[:, -1:], cos[:, :, -1:], sin[:, :, -1:], 1
            mask = None if mask is None else mask[:, :, -1:]  # the last query sees every key that is no pad
        if T == 1:
            # One query per row (decoding): viewed as (B, H_kv, rep, Dh), the `rep` query heads sharing a kv
            # head sit on the "time" axis, so attention runs on the kv heads as they are: no copy of k/v.
            q = apply_rope(self.q_proj(x).view(B, self.n_kv, rep, Dh), cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=Dh ** -0.5)  # (B, H_kv, rep, Dh)
        else:
            q = apply_rope(self.q_proj(x).view(B, T, self.n_head, Dh).transpose(1, 2), cos, sin)  # (B, H, T, Dh)
            # enable_gqa (no k/v copy per query head) only in generation's CPU prefill. Training keeps the
            # copy: compiled in bf16, enable_gqa rounds differently. Footgun: on CUDA, enable_gqa with a
            # mask falls back to SDPA's math backend.
            gqa = isinstance(past, KVCache) and rep > 1 and q.device.type == "cpu"
            kr, vr = k, v
            if rep > 1 and not gqa:  # (B, H_kv, S, Dh) -> (B, H, S, Dh), each kv head serving `rep` query heads
                kr, vr = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=mask is None, scale=Dh ** -0.5,
                                               enable_gqa=gqa).transpose(1, 2)  # (B, T, H, Dh)
        return self.o_proj(y.reshape(B, T, -1)), (k, v)  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past, last_only: bool = False):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def attention_mask_4d(attention_mask: torch.Tensor | None, T: int, S: int, device=None) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True = may attend: causal over the last T of S positions and no pads;
    None when plain causality suffices (SDPA's `is_causal`). A padded query row attends to nothing;
    SDPA returns zeros there (torch >= 2.5), so no NaN reaches a real token."""
    if attention_mask is None or bool(attention_mask.all()):
        return None if (T == 1 or T == S) else torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    causal = torch.ones(T, S, dtype=torch.bool, device=attention_mask.device).tril(S - T)  # (T, S)
    return causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq = {}  # per device; not a buffer, which model.to(bfloat16) would round
        self.grad_checkpointing = False  # recompute each layer in backward instead of storing its activations

    def inv_freq(self, device) -> torch.Tensor:  # (Dh/2,) fp32 RoPE frequencies
        if device not in self._inv_freq:
            d, theta = self.config.head_dim, self.config.rope_theta
            with torch.inference_mode(False):  # a normal tensor even if first built inside generate()
                self._inv_freq[device] = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float, device=device) / d))
        return self._inv_freq[device]

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, last_only=False,
                use_cache=True):
        """inputs_embeds (B, T, D) -> (hidden (B, T, D) after the final norm, new past, or None without use_cache).
        attention_mask: (B, T_past + T) 1/0, or a 4-D one from `attention_mask_4d` with position_ids.
        Positions default to cumsum(mask) - 1, so a left-padded row starts at 0, as in transformers.
        last_only: only the last position's state (B, 1, D), all generation needs from a prompt."""
        B, T, _ = inputs_embeds.shape
        static = isinstance(past_key_values, KVCache)
        T_past = past_key_values.length if static else past_key_values[0][0].shape[2] if past_key_values else 0
        built = attention_mask is not None and attention_mask.dim() == 4
        if position_ids is None and attention_mask is None:
            position_ids = torch.arange(T_past, T_past + T, device=inputs_embeds.device)[None].expand(B, -1)
        elif position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, T_past:]  # (B, T)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq(inputs_embeds.device), inputs_embeds.dtype)
        mask = attention_mask if built else attention_mask_4d(attention_mask, T, T_past + T, inputs_embeds.device)
        x, new_past = inputs_embeds, []
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            past = past_key_values if static else past_key_values[i] if past_key_values else None
            args = (x, cos, sin, mask, past, last_only and i == len(self.layers) - 1)
            x, kv = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
            if use_cache:  # else each layer's keys and values are freed as soon as the next layer runs
                new_past.append(kv)
        if static:
            past_key_values.length += T
            new_past = past_key_values
        return self.norm(x), new_past if use_cache else None


class CausalLM(nn.Module):
    """TextModel + output head. With tied embeddings there is no `lm_head` module at all."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
