"""Batched generation, gpt-fast style (`prefill`, `decode_one`, `sample`, `generate`), and `generate_ref`,
the no-cache oracle. A finished sequence gets `pad_token_id` and is still fed, as in transformers.
"""
import torch
import torch.nn.functional as F

from scl.llm import KVCache, attention_mask_4d


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 = greedy (argmax, first index on ties)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        # nucleus: keep the most likely tokens until their probability mass reaches top_p (at least one)
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reached top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, D) of the last position -> logits (B, V) fp32: only that position goes through the head."""
    return F.linear(hidden, model.lm_head_weight).float()


PREFILL_CHUNK = 64  # prompt tokens per prefill step


def prefill(model, input_ids, attention_mask, pixel_values, cache: KVCache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Prompt (B, T) with images -> next-token logits (B, V), filling `cache`, `chunk` tokens at a time so
    activations stay in the CPU's cache and the causal upper half is never computed."""
    x = model.embed(input_ids, pixel_values)  # (B, T, D): image features merged over the whole prompt
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T), as in TextModel.forward
    text = model.language_model.model
    for start in range(0, x.shape[1], chunk):
        end = min(start + chunk, x.shape[1])
        h, _ = text(x[:, start:end], attention_mask[:, :end], position_ids[:, start:end], cache, use_cache=True,
                    last_only=True)
    return last_logits(model, h[:, -1])


def decode_one(model, tokens, position_ids, mask, cache: KVCache) -> torch.Tensor:
    """tokens (B, 1) at position_ids (B, 1), mask (B, 1, 1, T_past + 1) or None -> next logits (B, V)."""
    h, _ = model.forward_hidden(tokens, None, mask, position_ids, past_key_values=cache, use_cache=True)
    return last_logits(model, h[:, -1])


# -------------------------------------------------------------------- the loop, shared bookkeeping
def _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
    if input_ids.dim() != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} and "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] has a 0 (right padding?)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.tensor(ids, dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (ids[0] if ids else 0)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    return eos, pad, done


def _next_token(logits, done, eos, pad, temperature, top_p, generator):
    """Sample, then overwrite rows already finished with pad. Updates `done` in place."""
    token = sample(logits, temperature, top_p, generator)  # (B,)
    if eos.numel():  # without EOS ids nothing ever finishes
        token = token.masked_fill(done, pad)
        done |= torch.isin(token, eos)
    return token


def generate(model, input_ids, attention_mask, pixel_values=None, *, max_new_tokens: int, eos_token_id,
             pad_token_id, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Left-padded prompts (B, T) -> new tokens (B, T_new), T_new <= max_new_tokens; EOS kept, then pads."""
    eos, pad, done = _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    B, T = input_ids.shape
    with torch.inference_mode():  # no autograd bookkeeping: steps are many, tiny
        cache = KVCache(model.config.text_config, B, T + max_new_tokens, model.lm_head_weight.dtype,
                        input_ids.device)
        logits = prefill(model, input_ids, attention_mask, pixel_values, cache)
        # Built once, as a decode step is a few hundred tiny ops: positions, and one mask sliced per step.
        position = attention_mask.sum(dim=1, keepdim=True)  # (B, 1): L_b, the first new token's position
        full = F.pad(attention_mask, (0, max_new_tokens), value=1)  # (B, T + max_new_tokens)
        mask = attention_mask_4d(full, 1, full.shape[1])  # (B, 1, 1, T + max_new) or None
        if mask is not None:  # additive: SDPA converts a boolean mask on every call (same result)
            zeros = torch.zeros(mask.shape, dtype=cache.k[0].dtype, device=mask.device)
            mask = zeros.masked_fill_(~mask, float("-inf"))
        out = []
        for step in range(max_new_tokens):
            token = _next_token(logits, done, eos, pad, temperature, top_p, generator)
            out.append(token)
            if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())):  # the check syncs a GPU
                break
            step_mask = None if mask is None else mask[..., :T + step + 1]  # (B, 1, 1, T_past + 1)
            logits = decode_one(model, token[:, None], position + step, step_mask, cache)
        out = torch.stack(out, dim=1)  # (B, T_new)
    return out.clone()  # footgun: an inference-mode tensor cannot be saved for backward (e.g. DPO's embedding)


@torch.no_grad()
def generate_ref(model, input_ids, attention_mask, pixel_values=None, *, max_new_tokens: int, eos_token_id,
                 pad_token_id, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Same contract as `generate`, no cache: the full sequence (image included) is recomputed each step."""
    eos, pad, done = _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    new = input_ids[:, :0]  # (B, 0): tokens generated so far
    mask = attention_mask
    for step in range(max_new_tokens):
        # Image features go to the prompt's image tokens only: a generated token that happens to be the
        # image id is an ordinary token (as with a cache, where it is never merged with features).
        x = torch.cat([model.embed(input_ids, pixel_values), model.embed(new)], dim=1)  # (B, T + step, D)
        h, _ = model.language_model.model(x, attention_mask=mask)
        token = _next_token(last_logits(model, h[:, -1]), done, eos, pad, temperature, top_p, generator)
        new = torch.cat([new, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if bool(done.all()):
            break
    return new  # (B, T_new)
