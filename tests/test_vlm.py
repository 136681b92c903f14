"""scl/vlm.py (+ vision.py, llm.py) against transformers' LlavaForConditionalGeneration on the same weights.

Both tiny families, every parameter re-randomized (tests/hf_fixtures.py). Logits must agree to
atol=rtol=1e-4 in fp32 on a left-padded batch of two with images; a wrong feature layer must miss by
far more, so the tolerance is known to bite. Run: python -m pytest -q tests/test_vlm.py
"""
import copy
import subprocess
import sys
import weakref

import pytest
import torch

import hf_fixtures as hx
from scl.weights import load_vlm

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=hx.KINDS)
def pair(request, tmp_path_factory):
    """(kind, hf_config, transformers model, our model) from one saved checkpoint."""
    path, config = hx.make_llava_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)
    return request.param, config, hx.load_hf(path), load_vlm(path)


def hf_logits(hf, ids, mask, pix):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pix, position_ids=hx.hf_position_ids(mask)).logits


def test_logits_match_transformers_left_padded_batch(pair):
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1)))
    assert (mask == 0).any(), "the batch must really be padded"
    with torch.no_grad():
        got = ours(ids, pix, mask)
    want = hf_logits(hf, ids, mask, pix)
    real = mask.bool()
    assert got.dtype == torch.float32 and got.shape == want.shape == (*ids.shape, config.text_config.vocab_size)
    torch.testing.assert_close(got[real], want[real], **TOL)
    assert want[real].std() > 0.5  # logits are O(1), so 1e-4 is a real tolerance


def test_batched_equals_each_sequence_alone(pair):
    """Left padding changes nothing for the real tokens: the batch agrees with unpadded single rows."""
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 1)))
    with torch.no_grad():
        batched = ours(ids, pix, mask)
        for b in range(len(ids)):
            real = mask[b].bool()
            alone = ours(ids[b, real][None], pix[b:b + 1])  # no mask, positions 0..T-1
            torch.testing.assert_close(batched[b, real], alone[0], **TOL)


def test_wrong_feature_layer_is_caught(pair):
    """Negative control: the same weights reading the wrong vision layer differ by far more than 1e-4."""
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    wrong = copy.deepcopy(ours)
    wrong.config.vision_feature_layer = -1 if config.vision_feature_layer == -2 else -2
    with torch.no_grad():
        diff = (wrong(ids, pix, mask) - hf_logits(hf, ids, mask, pix))[mask.bool()].abs().max()
    assert diff > 1e-2


def test_text_only_matches_transformers(pair):
    kind, config, hf, ours = pair
    ids = torch.tensor([[1, 5, 9, 33, 7, 2, 40]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **TOL)


def test_image_features_shape_and_merge_order(pair):
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    feats = ours.image_features(pix)
    P = ours.config.num_image_tokens
    assert P == config.image_seq_length == 16
    assert feats.shape == (2, P, config.text_config.hidden_size)
    x = ours.embed(ids, pix)
    is_image = ids == config.image_token_index
    torch.testing.assert_close(x[is_image], feats.reshape(-1, feats.shape[-1]))  # row-major order
    with torch.no_grad():
        want = hf.model.get_image_features(pixel_values=pix).pooler_output
    torch.testing.assert_close(feats.detach(), torch.stack(list(want)), **TOL)


def test_image_token_count_mismatch_is_a_clear_error(pair):
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config)
    ids[0, ids[0] == config.image_token_index] = 5  # row 0 loses its image tokens
    with pytest.raises(ValueError, match=r"16 image tokens .* 2 image\(s\) x 16 features = 32"):
        ours(ids, pix, mask)


def test_lm_head_weight_tied_or_not(pair):
    kind, config, hf, ours = pair
    W = ours.lm_head_weight
    assert W.shape == (config.text_config.vocab_size, config.text_config.hidden_size)
    embed = ours.language_model.model.embed_tokens.weight
    assert (W is embed) == (kind == "siglip_qwen2")
    torch.testing.assert_close(W, hf.lm_head.weight, atol=0, rtol=0)


def test_kv_cache_prefix_equals_full_pass_and_carries_gradients(pair):
    """forward_hidden on a prefix, then the suffix with the returned cache == one pass over everything."""
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 4)))
    full, _ = ours.forward_hidden(ids, pix, mask)
    cut = ids.shape[1] - 3  # image tokens all fall in the prefix
    h1, past = ours.forward_hidden(ids[:, :cut], pix, mask[:, :cut])
    assert len(past) == config.text_config.num_hidden_layers
    k, v = past[0]
    tc = ours.config.text_config
    assert k.shape == (2, tc.num_key_value_heads, cut, tc.head_dim)
    h2, past2 = ours.forward_hidden(ids[:, cut:], None, mask, past_key_values=past)
    assert past2[0][0].shape[2] == ids.shape[1] and past[0][0].shape[2] == cut  # functional: old cache intact
    real = mask.bool()
    torch.testing.assert_close(torch.cat([h1, h2], 1)[real], full[real], **TOL)
    h2.sum().backward()  # the suffix's loss reaches vision weights through the cached prefix
    assert ours.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    ours.zero_grad(set_to_none=True)


def test_without_use_cache_each_layers_keys_and_values_die_during_the_pass(pair):
    """A pass whose cache nobody keeps (DPO's response pass) must free each layer's (k, v) as it goes, not
    hold all of them to the end (at a real model's size, hundreds of MB); the hidden states are the same."""
    kind, config, hf, ours = pair
    ids, mask, pix = hx.make_batch(config, text_lengths=((3, 5), (1, 4)))
    layers = ours.language_model.model.layers
    kept, alive = [], []  # weak references to each layer's keys; how many of the older ones live on
    hooks = [layer.self_attn.register_forward_hook(lambda m, args, out: kept.append(weakref.ref(out[1][0])))
             for layer in layers]
    hooks += [layer.register_forward_pre_hook(lambda m, args: alive.append(sum(r() is not None for r in kept[:-1])))
              for layer in layers]  # kept[-1]: the layer just run, still the loop's variable
    try:
        with torch.no_grad():
            full, past = ours.forward_hidden(ids, pix, mask)
            assert alive == [0] + list(range(len(layers) - 1))  # with the cache: every older layer's
            kept.clear()
            alive.clear()
            h, none = ours.forward_hidden(ids, pix, mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert none is None and alive == [0] * len(layers)
    torch.testing.assert_close(h, full, rtol=0, atol=0)  # the same computation


def test_bf16_runs_close_to_fp32(pair, tmp_path):
    kind, config, hf, ours = pair
    from scl.weights import save_vlm

    save_vlm(ours, tmp_path)
    low = load_vlm(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    ids, mask, pix = hx.make_batch(config)
    with torch.no_grad():
        a, b = ours(ids, pix, mask), low(ids, pix, mask)
    assert b.dtype == torch.float32
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() < 0.25  # bf16 keeps ~3 significant digits
    assert (a[real].argmax(-1) == b[real].argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("kind,extra", [
    ("clip_llama", dict(text_extra=dict(head_dim=16, attention_bias=True, mlp_bias=True))),  # Dh != D/H, all biases
    ("clip_llama", dict(llava_extra=dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"))),
    ("siglip_qwen2", dict(llava_extra=dict(vision_feature_select_strategy="default"))),  # drops SigLIP's token 0
], ids=["llama-bias-head_dim", "feature-layer-list", "siglip-default"])
def test_config_variants_match_transformers(kind, extra, tmp_path):
    path, config = hx.make_llava_checkpoint(tmp_path, kind, seed=3, **extra)
    hf, ours = hx.load_hf(path), load_vlm(path)
    assert ours.config.num_image_tokens == config.image_seq_length
    ids, mask, pix = hx.make_batch(config)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pix, mask)[real], hf_logits(hf, ids, mask, pix)[real], **TOL)


def test_runtime_never_imports_transformers():
    code = ("import sys, scl.vlm, scl.weights, scl.generation, scl.config; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers']; "
            "assert not bad, bad; print('ok')")
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
