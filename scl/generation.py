"""Batched generation, gpt-fast style (`prefill`, `sample`, `generate`'s decode loop), a `Context` that keeps
a conversation's KV cache from one turn to the next, and `generate_ref`, the no-cache oracle. A finished
sequence gets `pad_token_id` and is still fed, as in transformers.
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
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))  # back in vocab order
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)  # (B,)


def last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """hidden (B, D) of the last position -> logits (B, V) fp32: only that position goes through the head."""
    return F.linear(hidden, model.lm_head_weight).float()


def prefill(model, input_ids, attention_mask, pixel_values, cache: KVCache, chunk: int = 64) -> torch.Tensor:
    """New tokens (B, T) with their images, after the cache.length positions `cache` holds; attention_mask
    (B, cache.length + T) covers both -> next-token logits (B, V), filling `cache` `chunk` tokens at a time
    so activations stay in the CPU's cache and the causal upper half is never computed."""
    past, T = cache.length, input_ids.shape[1]
    x = model.embed(input_ids, pixel_values)  # (B, T, D): image features merged over the whole prompt
    text = model.language_model.model
    for start in range(0, T, chunk):  # positions come from the mask: cumsum - 1 over all it covers
        end = min(start + chunk, T)
        h, _ = text(x[:, start:end], attention_mask[:, :past + end], past_key_values=cache, last_only=True)
    return last_logits(model, h[:, -1])


class Context(KVCache):
    """A KV cache that also remembers each position's token and whether it is still part of its row's
    conversation (`keep`), so a later turn of a multi-turn rollout prefills only what its rendering adds
    to what the cache holds: the image and the turn-1 prompt are computed once. The cache grows as needed;
    positions dropped from a conversation stay in it, masked out."""

    def __init__(self, model, batch: int):
        weight = model.lm_head_weight
        super().__init__(model.config.text_config, batch, 0, weight.dtype, weight.device)
        self.tokens = torch.zeros(batch, 0, dtype=torch.long, device=weight.device)  # (B, L) ids fed
        self.keep = torch.zeros(batch, 0, dtype=torch.long, device=weight.device)  # (B, L) 1 = in the conversation

    def reserve(self, n: int):
        """Room for n positions in all (copying what is held when it must grow)."""
        if n > self.max_len:
            def grow(t):
                return torch.cat([t[:, :, :self.length], t.new_empty(*t.shape[:2], n - self.length, t.shape[3])], 2)
            self.k, self.v, self.max_len = [grow(t) for t in self.k], [grow(t) for t in self.v], n

    def state(self):
        """What the cache holds now; `restore(state)` forgets what is fed after it (its slots are reused)."""
        return self.length, self.tokens, self.keep  # tokens and keep are replaced, never written in place

    def restore(self, state):
        self.length, self.tokens, self.keep = state

    def new_tokens(self, ids: list[list[int]]) -> list[list[int]]:
        """The ids each row's conversation should now be -> the ids still to feed: what follows the longest
        prefix the cache already holds (at least the last id, whose logits start the next answer). Held
        positions after that prefix leave the conversation."""
        tokens, keep, feed = self.tokens.tolist(), self.keep.tolist(), []
        for b, want in enumerate(ids):
            held = [j for j, k in enumerate(keep[b]) if k]
            n = 0
            while n < min(len(held), len(want) - 1) and tokens[b][held[n]] == want[n]:
                n += 1
            for j in held[n:]:
                keep[b][j] = 0
            feed.append(want[n:])
        self.keep = torch.tensor(keep, dtype=torch.long, device=self.keep.device)  # (B, L)
        return feed


# -------------------------------------------------------------------- the loop, shared bookkeeping
def _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
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
             generator: torch.Generator | None = None, context: Context | None = None) -> torch.Tensor:
    """Left-padded prompts (B, T) -> new tokens (B, T_new), T_new <= max_new_tokens; EOS kept, then pads.
    `context`: continue the conversations it holds (input_ids: each row's ids from `context.new_tokens`,
    left-padded); it is left holding the prompts and the new tokens, ready for the next turn."""
    eos, pad, done = _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    B, T = input_ids.shape
    with torch.inference_mode():  # no autograd bookkeeping: steps are many, tiny
        cache = Context(model, B) if context is None else context
        cache.reserve(cache.length + T + max_new_tokens)
        past = cache.length
        history = torch.cat([cache.keep, attention_mask], dim=1)  # (B, past + T)
        logits = prefill(model, input_ids, history, pixel_values, cache)
        # Built once, as a decode step is a few hundred tiny ops: positions, and one mask sliced per step.
        position = history.sum(dim=1, keepdim=True)  # (B, 1): the first new token's position
        full = F.pad(history, (0, max_new_tokens), value=1)  # (B, past + T + max_new_tokens)
        mask = attention_mask_4d(full, 1, full.shape[1])  # (B, 1, 1, past + T + max_new) or None
        if mask is not None:  # additive: SDPA converts a boolean mask on every call (same result)
            mask = mask.new_zeros(mask.shape, dtype=cache.k[0].dtype).masked_fill_(~mask, float("-inf"))
        out = []
        for step in range(max_new_tokens):
            token = _next_token(logits, done, eos, pad, temperature, top_p, generator)
            out.append(token)
            if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())):  # the check syncs a GPU
                break
            step_mask = None if mask is None else mask[..., :past + T + step + 1]  # (B, 1, 1, T_past + 1)
            h, _ = model.forward_hidden(token[:, None], None, step_mask, position + step, cache)  # (B, 1, D)
            logits = last_logits(model, h[:, -1])
        out = torch.stack(out, dim=1)  # (B, T_new)
        # what the cache now holds: the prompts and every new token but the last, which was never fed
        cache.tokens = torch.cat([cache.tokens, input_ids, out[:, :cache.length - past - T]], dim=1)
        cache.keep = full[:, :cache.length]
    return out.clone()  # footgun: an inference-mode tensor cannot be saved for backward (e.g. DPO's embedding)


@torch.no_grad()
def generate_ref(model, input_ids, attention_mask, pixel_values=None, *, max_new_tokens: int, eos_token_id,
                 pad_token_id, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Same contract as `generate`, no cache: the full sequence (image included) is recomputed each step."""
    eos, pad, done = _setup(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
    new = input_ids[:, :0]  # (B, 0): tokens generated so far
    for step in range(max_new_tokens):
        # Image features go to the prompt's image tokens only: a generated token that happens to be the
        # image id is an ordinary token (as with a cache, where it is never merged with features).
        x = torch.cat([model.embed(input_ids, pixel_values), model.embed(new)], dim=1)  # (B, T + step, D)
        h, _ = model.language_model.model(x, F.pad(attention_mask, (0, step), value=1), use_cache=False)
        token = _next_token(last_logits(model, h[:, -1]), done, eos, pad, temperature, top_p, generator)
        new = torch.cat([new, token[:, None]], dim=1)
        if bool(done.all()):
            break
    return new  # (B, T_new)
