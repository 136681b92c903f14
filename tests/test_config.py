"""scl/config.py: the same resolved values as transformers' LlavaConfig for published and written configs.

The published llava-1.5-7b-hf and llava-interleave-qwen-0.5b-hf config.json files are reconstructed
written down from the published llava-hf configs (no hub access). Run: python -m pytest -q tests/test_config.py
"""
import copy
import json

import pytest

import hf_fixtures as hx
from scl.config import ConfigError, VLMConfig

LLAVA_15_7B = {  # llava-hf/llava-1.5-7b-hf config.json: most fields left to transformers' defaults
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
INTERLEAVE_QWEN_05B = {  # llava-hf/llava-interleave-qwen-0.5b-hf: SigLIP + Qwen2, tied, layer -1, "full"
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 151646, "model_type": "llava",
    "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
    "torch_dtype": "bfloat16",
    "text_config": {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816,
                    "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
                    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "vocab_size": 152000,
                    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
                    "rms_norm_eps": 1e-06, "torch_dtype": "bfloat16"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26,
                      "patch_size": 14, "vision_use_head": False},
}


def hf_resolved(d: dict) -> dict:
    """What transformers 5.24 makes of a config dict, in our field names."""
    from transformers import LlavaConfig

    c = LlavaConfig.from_dict(copy.deepcopy(d))
    t, v = c.text_config, c.vision_config
    try:
        head_dim = t.head_dim or t.hidden_size // t.num_attention_heads
    except AttributeError:  # Qwen2Config has no head_dim field unless the file sets one
        head_dim = t.hidden_size // t.num_attention_heads
    qwen = t.model_type == "qwen2"
    return {
        "vision": {k: getattr(v, k) for k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                              "layer_norm_eps", "num_channels")},
        "text": {**{k: getattr(t, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                               "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                               "rms_norm_eps", "max_position_embeddings", "hidden_act",
                                               "bos_token_id", "eos_token_id")},
                 "head_dim": head_dim, "rope_theta": t.rope_parameters["rope_theta"],
                 "attention_bias": True if qwen else t.attention_bias, "mlp_bias": False if qwen else t.mlp_bias},
        "top": {"image_token_index": c.image_token_id, "vision_feature_layer": c.vision_feature_layer,
                "vision_feature_select_strategy": c.vision_feature_select_strategy,
                "projector_hidden_act": c.projector_hidden_act,
                "multimodal_projector_bias": c.multimodal_projector_bias,
                "tie_word_embeddings": c.tie_word_embeddings, "pad_token_id": getattr(c, "pad_token_id", None),
                "num_image_tokens": c.image_seq_length},
    }


def ours_resolved(cfg: VLMConfig) -> dict:
    want = hf_resolved({"model_type": "llava"})  # only for the key lists
    v, t = cfg.vision_config, cfg.text_config
    return {"vision": {k: getattr(v, k) for k in want["vision"]}, "text": {k: getattr(t, k) for k in want["text"]},
            "top": {**{k: getattr(cfg, k) for k in want["top"] if k != "num_image_tokens"},
                    "num_image_tokens": cfg.num_image_tokens}}


@pytest.mark.parametrize("published", [LLAVA_15_7B, INTERLEAVE_QWEN_05B], ids=["llava-1.5-7b", "interleave-0.5b"])
def test_published_configs_resolve_like_transformers(published):
    ours = VLMConfig.from_dict(copy.deepcopy(published))
    want = hf_resolved(published)
    if published is INTERLEAVE_QWEN_05B:  # LlavaConfig keeps the default 576; the processor uses 27*27
        want["top"]["num_image_tokens"] = 729
    assert ours_resolved(ours) == want


def test_llava_15_defaults_spelled_out():
    c = VLMConfig.from_dict(LLAVA_15_7B)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 32)
    assert (t.intermediate_size, t.rope_theta, t.head_dim, t.tie_word_embeddings) == (11008, 10000.0, 128, False)
    assert (v.hidden_act, v.layer_norm_eps, c.num_image_tokens, c.dtype) == ("quick_gelu", 1e-5, 576, "float16")


@pytest.mark.parametrize("kind", hx.KINDS)
def test_transformers_written_config_and_round_trip(kind):
    written = hx.tiny_hf_config(kind).to_dict()  # 5.x style: rope_parameters, dtype, everything spelled out
    ours = VLMConfig.from_dict(written)
    assert ours_resolved(ours) == hf_resolved(written)
    again = ours.to_dict()
    json.dumps(again)  # serializable
    assert VLMConfig.from_dict(again) == ours
    assert hf_resolved(again) == hf_resolved(written)  # transformers reads ours back the same


def test_aliases_resolve_identically():
    base = copy.deepcopy(INTERLEAVE_QWEN_05B)
    variant = copy.deepcopy(base)
    variant["image_token_id"] = variant.pop("image_token_index")
    variant["dtype"] = variant.pop("torch_dtype")
    variant["text_config"]["rope_parameters"] = {"rope_type": "default",
                                                 "rope_theta": variant["text_config"].pop("rope_theta")}
    assert VLMConfig.from_dict(variant) == VLMConfig.from_dict(base)
    tied_top = copy.deepcopy(base)
    tied_top["text_config"]["tie_word_embeddings"] = False
    tied_top["tie_word_embeddings"] = True
    a, b = VLMConfig.from_dict(tied_top), VLMConfig.from_dict(base)
    assert a.tie_word_embeddings and b.tie_word_embeddings and a.text_config.tie_word_embeddings


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(model_type="llava_next"), r"my/config\.json: model_type: unsupported 'llava_next'"),
    (lambda d: d["text_config"].update(model_type="mistral"), r"my/config\.json: text_config\.model_type: .*'mistral'"),
    (lambda d: d["vision_config"].update(model_type="dinov2"), r"vision_config\.model_type: unsupported 'dinov2'"),
    (lambda d: d["text_config"].update(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     r"text_config\.rope_parameters\.rope_type: unsupported 'llama3'"),
    (lambda d: d.update(vision_feature_layer=-30), r"vision_feature_layer: -30 out of range for 25"),
    (lambda d: d["text_config"].update(hidden_size="big"), r"text_config\.hidden_size: expected a number"),
])
def test_bad_config_names_file_and_key(edit, match):
    d = copy.deepcopy(LLAVA_15_7B)
    edit(d)
    with pytest.raises(ConfigError, match=match) as info:
        VLMConfig.from_dict(d, source="my/config.json")
    assert "\n" not in str(info.value)


def test_from_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        VLMConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B))
    assert VLMConfig.from_file(tmp_path / "config.json") == VLMConfig.from_dict(LLAVA_15_7B)
