"""scl/generation.py: KV-cache generate == no-cache generate_ref, and greedy == transformers' generate.

Run: python -m pytest -q tests/test_generation.py
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import hf_fixtures as hx
import scl.generation as generation
from scl.generation import Context, generate, generate_ref, prefill, sample
from scl.llm import KVCache
from scl.tokenizer import pad_left
from scl.weights import load_vlm

NEW = 16


@pytest.fixture(scope="module", params=hx.KINDS)
def pair(request, tmp_path_factory):
    path, config = hx.make_llava_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param, seed=1)
    return config, hx.load_hf(path), load_vlm(path)


def hf_generate(hf, ids, mask, pix, eos, pad, n=NEW):
    return hx.hf_generate(hf, ids, mask, pix, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad)


def test_greedy_matches_transformers_generate_with_per_sequence_eos(pair):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1)))
    pad = config.pad_token_id
    free = hf_generate(hf, ids, mask, pix, eos=None, pad=pad)  # no EOS: the model's free run
    assert free.shape == (2, NEW)
    got = generate(ours, ids, mask, pix, max_new_tokens=NEW, eos_token_id=None, pad_token_id=pad)
    torch.testing.assert_close(got, free, atol=0, rtol=0)
    # Call EOS a token the two rows first emit at different steps: one row stops, the other runs on.
    def first(row, t):
        return row.index(t) if t in row else NEW

    rows = free.tolist()
    eos = max(set(rows[0] + rows[1]), key=lambda t: (min(first(rows[0], t), first(rows[1], t)) >= 1,
                                                      abs(first(rows[0], t) - first(rows[1], t))))
    stops = [first(rows[0], eos), first(rows[1], eos)]
    assert min(stops) >= 1 and stops[0] != stops[1], "fixture seed gives no usable EOS candidate"
    want = hf_generate(hf, ids, mask, pix, eos=eos, pad=pad)
    got = generate(ours, ids, mask, pix, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=pad)
    for b, stop in enumerate(stops):
        if stop < NEW:  # EOS kept, then pads
            assert got[b, stop] == eos and (got[b, stop + 1:] == pad).all()
    assert got.shape == (2, max(stops) + 1 if max(stops) < NEW else NEW)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_greedy_batch_of_five_matches_transformers_and_recompute(pair):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1), (2, 0), (0, 4), (4, 2)))
    kw = dict(max_new_tokens=NEW, eos_token_id=None, pad_token_id=config.pad_token_id)
    got = generate(ours, ids, mask, pix, **kw)
    torch.testing.assert_close(got, hf_generate(hf, ids, mask, pix, eos=None, pad=config.pad_token_id), atol=0, rtol=0)
    torch.testing.assert_close(got, generate_ref(ours, ids, mask, pix, **kw), atol=0, rtol=0)


def test_cache_equals_recompute_greedy(pair):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1), (2, 0)))
    kw = dict(max_new_tokens=20, eos_token_id=[2, 7], pad_token_id=config.pad_token_id)
    fast, ref = generate(ours, ids, mask, pix, **kw), generate_ref(ours, ids, mask, pix, **kw)
    assert fast.shape[1] >= 1
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_cache_equals_recompute_sampled_same_seed(pair, temperature, top_p):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1)))
    kw = dict(max_new_tokens=12, eos_token_id=None, pad_token_id=config.pad_token_id,
              temperature=temperature, top_p=top_p)
    fast = generate(ours, ids, mask, pix, generator=torch.Generator().manual_seed(3), **kw)
    ref = generate_ref(ours, ids, mask, pix, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(fast, ref, atol=0, rtol=0)
    other = generate(ours, ids, mask, pix, generator=torch.Generator().manual_seed(4), **kw)
    assert not torch.equal(fast, other)  # the seed matters: this really sampled
    greedy = generate(ours, ids, mask, pix, **{**kw, "temperature": 0.0})
    assert not torch.equal(fast, greedy)


def test_chunked_prefill_equals_one_pass(pair):
    """prefill a few tokens at a time, the last layer for the last position only == one plain forward:
    same next-token logits, and the cache holds the prompt's keys/values."""
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1)))
    B, T = ids.shape
    with torch.inference_mode():
        h, past = ours.forward_hidden(ids, pix, mask)
        want = (h[:, -1] @ ours.lm_head_weight.T).float()  # (B, V)
        for chunk in (1, 5, T):
            cache = KVCache(ours.config.text_config, B, T + 3, torch.float32)
            got = prefill(ours, ids, mask, pix, cache, chunk=chunk)
            assert cache.length == T
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            for layer, (k, v) in enumerate(past):
                torch.testing.assert_close(cache.k[layer][:, :, :T], k, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[layer][:, :, :T], v, atol=1e-5, rtol=1e-5)


def test_prefill_with_a_cache_equals_the_training_path(pair):
    """Prefill against a KVCache lets SDPA share each kv head among its query heads (enable_gqa); the
    training path copies k/v per query head. Same numbers up to fp32 rounding: with pads, in two chunks
    (the second attending to the first through the cache / the functional past)."""
    config, hf, ours = pair
    text = ours.language_model.model
    torch.manual_seed(0)
    B, T, split = 3, 9, 5
    x = torch.randn(B, T, text.config.hidden_size)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2], mask[2, :4] = 0, 0  # left padding
    with torch.inference_mode():
        cache = KVCache(text.config, B, T, torch.float32)
        got1, _ = text(x[:, :split], mask[:, :split], past_key_values=cache)
        got2, _ = text(x[:, split:], mask, past_key_values=cache)
        want1, past = text(x[:, :split], mask[:, :split])
        want2, _ = text(x[:, split:], mask, past_key_values=past)
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)


def test_a_context_continues_conversations_as_a_fresh_prefill_of_them(pair):
    """Three turns through one Context == each turn's whole conversation from scratch (generate_ref):
    rows that stopped early (pads after EOS in the cache), a row whose rendering drops the last answer
    token, another whose rendering differs inside the prompt (its image is read again), and the cache
    growing past its first size. Only what the cache lacks is fed."""
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1), (2, 0), (0, 4)))
    kw = dict(max_new_tokens=7, eos_token_id=[2, 7], pad_token_id=config.pad_token_id)
    image_id = config.image_token_index
    convs = [r[m.bool()].tolist() for r, m in zip(ids, mask)]  # each row's conversation so far, unpadded
    context = Context(ours, len(convs))
    for turn in range(3):
        if turn:  # the next user message; row 2 re-renders without its answer's last token
            convs = [c + [11 + turn, 12, 13 + b] for b, c in enumerate(convs)]
            convs[2] = convs[2][:-4] + convs[2][-3:]
        if turn == 1:  # row 3's rendering changes right after BOS: all of it but BOS is fed again
            convs[3] = convs[3][:1] + [14] + convs[3][1:]
        feed = context.new_tokens(convs)
        if turn:  # the new message, and the last answer token where it was never fed
            assert all(3 <= len(f) <= 4 and image_id not in f for f in feed[:3])
            assert feed[3] == convs[3][1:] if turn == 1 else len(feed[3]) <= 4
        see = torch.tensor([image_id in f for f in feed])
        got = generate(ours, *pad_left(feed, config.pad_token_id), pix[see] if see.any() else None,
                       context=context, **kw)
        want = generate_ref(ours, *pad_left(convs, config.pad_token_id), pix, **kw)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        answers = [[t for t in row if t != config.pad_token_id] for row in got.tolist()]
        convs = [c + a[:next((i + 1 for i, t in enumerate(a) if t in (2, 7)), len(a))] for c, a in zip(convs, answers)]
    assert context.max_len > ids.shape[1] + kw["max_new_tokens"]  # it grew


def test_stops_when_every_sequence_is_done(pair):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    first = generate(ours, ids, mask, pix, max_new_tokens=1, eos_token_id=None, pad_token_id=0)
    out = generate(ours, ids, mask, pix, max_new_tokens=30, eos_token_id=first[:, 0].tolist(), pad_token_id=0)
    assert out.shape == (2, 1)  # each row's first token is an EOS: no second step runs


def test_generated_image_token_is_an_ordinary_token(pair):
    """A generated token equal to the image id is embedded as a token, never merged with image features
    (transformers behaves the same: features only go in at prefill)."""
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    free = generate(ours, ids, mask, pix, **kw)
    # Re-mark the image positions with a token the model emits (after step 1, so it is fed back in) and
    # that the prompt text lacks: the prompt's embeddings, hence the run, are unchanged.
    text = ids[ids != config.image_token_index].tolist()
    marker = next(t for t in free[:, 1:-1].flatten().tolist() if t not in text)
    model = copy.deepcopy(ours)
    model.config.image_token_index = marker
    ids2 = ids.masked_fill(ids == config.image_token_index, marker)
    fast, ref = generate(model, ids2, mask, pix, **kw), generate_ref(model, ids2, mask, pix, **kw)
    torch.testing.assert_close(fast, free, atol=0, rtol=0)
    torch.testing.assert_close(ref, free, atol=0, rtol=0)


def test_right_padding_is_rejected(pair):
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, ids, mask.flip(1), pix, max_new_tokens=2, eos_token_id=2, pad_token_id=0)


def test_sample_greedy_top_p_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]
    # top_p below the top token's probability keeps only that token
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.3, g) for _ in range(50)])
    assert (draws == torch.tensor([1, 0])).all()
    # row 0 probabilities (.48, .43, .06, .02) for tokens (1, 3, 2, 0): top_p 0.95 keeps 1, 3 and 2, never 0
    draws = torch.stack([sample(logits, 1.0, 0.95, g) for _ in range(400)])[:, 0]
    assert set(draws.tolist()) == {1, 2, 3}
    a = sample(logits.repeat(64, 1), 1.0, 1.0, torch.Generator().manual_seed(7))
    b = sample(logits.repeat(64, 1), 1.0, 1.0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_generated_tokens_and_model_train_afterwards(pair):
    """generate runs under inference_mode; its output and the model must still work with autograd
    (rollouts feed DPO training on the same model)."""
    config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    new = generate(ours, ids, mask, pix, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    full = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    logits = ours(full, pix, full_mask)
    logits[:, -4:].logsumexp(-1).sum().backward()
    text = ours.language_model.model
    for p in (text.embed_tokens.weight, text.layers[0].self_attn.q_proj.weight,
              ours.multi_modal_projector.linear_1.weight, ours.vision_tower.encoder.layers[0].mlp.fc1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)
