"""scl/weights.py: every key layout and shards load; broken folders fail with one line naming file and key;
save_vlm writes what transformers loads with no missing or unexpected keys.

Run: python -m pytest -q tests/test_weights.py
"""
import json

import pytest
import torch
from safetensors import safe_open

import hf_fixtures as hx
from scl.weights import CheckpointError, load_vlm, save_vlm


@pytest.fixture(scope="module", params=hx.KINDS)
def ckpt(request, tmp_path_factory):
    """(kind, path, hf_config, state dict of our model loaded from the save_pretrained output)."""
    path, config = hx.make_llava_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param, seed=2)
    return request.param, path, config, load_vlm(path).state_dict()


@pytest.fixture(scope="module")
def tensors(ckpt):
    return hx.read_tensors(ckpt[1])


def assert_same_state(model, want):
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("layout", hx.LAYOUTS)
def test_every_key_layout_loads_identically(ckpt, layout, tmp_path):
    kind, path, config, want = ckpt
    dst = hx.rewrite_layout(path, tmp_path / layout, layout)
    keys = set(hx.read_tensors(dst))
    marker = {"a": "vision_tower.vision_model.", "b": "model.vision_tower.embeddings.",
              "c": "vision_tower.embeddings.", "d": "model.vision_tower.vision_model."}[layout]
    assert any(k.startswith(marker) for k in keys)  # the fixture really wrote that layout
    assert_same_state(load_vlm(dst), want)


def test_two_shard_checkpoint_loads(ckpt, tmp_path):
    kind, path, config, want = ckpt
    dst = hx.make_sharded_copy(hx.rewrite_layout(path, tmp_path / "a", "a"), tmp_path / "sharded", n_shards=2)
    assert len(list(dst.glob("model-0000*-of-00002.safetensors"))) == 2
    assert_same_state(load_vlm(dst), want)


def test_unused_buffers_and_siglip_head_are_dropped(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    extra = {"vision_tower.embeddings.position_ids": torch.arange(17)[None],
             "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
             "vision_tower.head.probe": torch.zeros(1, 1, 32)}
    dst = hx.write_tensors(tmp_path / "x", {**tensors, **extra}, like=path)
    assert_same_state(load_vlm(dst), want)


def load_error(tmp_path, tensors, like, name="broken") -> str:
    dst = hx.write_tensors(tmp_path / name, tensors, like=like)
    with pytest.raises(CheckpointError) as info:
        load_vlm(dst)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    msg = load_error(tmp_path, {k: v for k, v in tensors.items() if k != key}, path)
    assert "model.safetensors" in msg and "missing key" in msg and key in msg


def test_unexpected_key(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    msg = load_error(tmp_path, {**tensors, "language_model.model.layers.7.mlp.up_proj.weight": torch.ones(2)}, path)
    assert "model.safetensors" in msg and "unexpected key 'language_model.model.layers.7.mlp.up_proj.weight'" in msg


def test_wrong_shape(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    key = "multi_modal_projector.linear_1.weight"
    msg = load_error(tmp_path, {**tensors, key: torch.zeros(3, 3)}, path)
    assert "model.safetensors" in msg and f"key {key!r} has shape (3, 3)" in msg and "(48, 32)" in msg


def test_unknown_model_type(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    dst = hx.write_tensors(tmp_path / "mt", tensors, like=path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: text_config\.model_type: unsupported 'mistral'"):
        load_vlm(dst)


def test_truncated_safetensors(ckpt, tensors, tmp_path):
    kind, path, config, want = ckpt
    dst = hx.write_tensors(tmp_path / "cut", tensors, like=path)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_vlm(dst)
    assert str(info.value).startswith(str(dst / "model.safetensors")) and "truncated" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_shard_named(ckpt, tmp_path):
    kind, path, config, want = ckpt
    dst = hx.make_sharded_copy(path, tmp_path / "sharded", n_shards=2)
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index\.json: shard 'model-00002-of-00002\.safetensors' listed for key"):
        load_vlm(dst)


def test_save_loads_in_transformers_with_same_logits(ckpt, tmp_path):
    kind, path, config, want = ckpt
    from transformers import LlavaForConditionalGeneration

    ours = load_vlm(path)
    save_vlm(ours, tmp_path / "saved")
    files = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]  # no temp files left
    with safe_open(tmp_path / "saved" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert ("language_model.lm_head.weight" in keys) == (kind == "clip_llama")  # tied: no head written
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in keys)  # layout (a)
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", output_loading_info=True,
                                                             attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask, pix = hx.make_batch(config)
    with torch.no_grad():
        want_logits = hf.eval()(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                position_ids=hx.hf_position_ids(mask)).logits
        got = ours(ids, pix, mask)
    torch.testing.assert_close(got[mask.bool()], want_logits[mask.bool()], atol=1e-4, rtol=1e-4)
    assert_same_state(load_vlm(tmp_path / "saved"), want)  # and our own round trip is exact
    gen = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": config.pad_token_id}


def test_save_bf16_keeps_dtype(ckpt, tmp_path):
    kind, path, config, want = ckpt
    save_vlm(load_vlm(path, dtype=torch.bfloat16), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_vlm(tmp_path)  # stored bf16, loaded as the default fp32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k].bfloat16().float()), k
