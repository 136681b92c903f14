"""Model configuration: the LLaVA `config.json` as three dataclasses.

Published configs omit most fields (llava-1.5-7b-hf's `text_config` holds four keys); `from_dict`
fills them with transformers' defaults per `model_type` and accepts the spellings found in the wild.
`to_dict` writes a `config.json` transformers can load. Errors are one line naming file and key.
"""
import dataclasses
import json
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config.json we cannot use; the message names the file and the key."""


# transformers 5.24 defaults for fields a config.json leaves out, per model_type (CLIPVisionConfig,
# SiglipVisionConfig, LlamaConfig, Qwen2Config). The dataclass defaults below are LLaVA-1.5-7B's.
_VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, projection_dim=512)
VISION_DEFAULTS = {
    "clip_vision_model": dict(_VIT_B, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(_VIT_B, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None),
}
VISION_ACTS = ("quick_gelu", "gelu", "gelu_pytorch_tanh")


@dataclass
class VisionConfig:
    """The image encoder: CLIP ViT (class token, pre-LN) or SigLIP (neither)."""
    model_type: str = "clip_vision_model"  # "clip_vision_model" | "siglip_vision_model"
    hidden_size: int = 1024  # D of the vision tower
    intermediate_size: int = 4096  # MLP width
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336  # S: pixel_values are (B, 3, S, S)
    patch_size: int = 14  # conv kernel = stride; (S / patch)^2 patches
    hidden_act: str = "quick_gelu"  # CLIP: x * sigmoid(1.702 x); SigLIP: tanh GELU
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    projection_dim: int | None = 768  # CLIP's contrastive head width; unused by LLaVA, kept for round trips

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.model_type == "clip_vision_model"


@dataclass
class TextConfig:
    """The decoder LLM: Llama or Qwen2 (q/k/v biases hard-wired on)."""
    model_type: str = "llama"  # "llama" | "qwen2"
    vocab_size: int = 32064  # V
    hidden_size: int = 4096  # D
    intermediate_size: int = 11008  # SwiGLU width
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H query heads
    num_key_value_heads: int | None = None  # GQA: H_kv; None means = H
    head_dim: int | None = None  # Dh; None means D / H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # q/k/v biases (Llama: o_proj too); Qwen2 always has q/k/v biases
    mlp_bias: bool = False  # Llama's optional gate/up/down biases
    tie_word_embeddings: bool = False  # output head = embed_tokens
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2Attention hard-codes q/k/v bias=True, o_proj bias=False


@dataclass
class VLMConfig:
    """LLaVA: vision tower -> 2-layer projector -> LLM, image features written over image tokens."""
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 32000  # the id whose positions receive image features
    vision_feature_layer: int | list[int] = -2  # index into the vision hidden states (list: concat)
    vision_feature_select_strategy: str = "default"  # "default" drops token 0 (CLS), "full" keeps all
    projector_hidden_act: str = "gelu"  # exact erf GELU between linear_1 and linear_2
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False  # resolved: top-level OR text_config flag (as LlavaConfig)
    pad_token_id: int | None = None
    dtype: str | None = None  # the checkpoint's stored dtype, e.g. "float16"; informational

    @property
    def num_image_tokens(self) -> int:
        """P: image tokens per image. transformers drops token 0 under "default" even for SigLIP."""
        v = self.vision_config
        return v.num_patches + int(v.has_class_token) - int(self.vision_feature_select_strategy == "default")

    @property
    def feature_layers(self) -> list[int]:
        layer = self.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @classmethod
    def from_file(cls, path) -> "VLMConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "VLMConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "llava") != "llava":
            raise ConfigError(f"{source}: model_type: unsupported {d['model_type']!r} (supported: 'llava')")
        # LlavaConfig: no vision_config means CLIP ViT-L/14-336 (our defaults); no text_config, LlamaConfig()
        vision = VisionConfig() if d.get("vision_config") is None else _read_vision(d["vision_config"], source)
        text = _read_text(d.get("text_config") or {}, source)
        image_token = d.get("image_token_index", d.get("image_token_id", 32000))
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"{source}: vision_feature_select_strategy: unsupported {strategy!r}")
        act = d.get("projector_hidden_act", "gelu")
        if act not in VISION_ACTS:
            raise ConfigError(f"{source}: projector_hidden_act: unsupported {act!r}")
        cfg = cls(vision_config=vision, text_config=text, image_token_index=image_token,
                  vision_feature_layer=d.get("vision_feature_layer", -2), vision_feature_select_strategy=strategy,
                  projector_hidden_act=act, multimodal_projector_bias=d.get("multimodal_projector_bias", True),
                  tie_word_embeddings=bool(d.get("tie_word_embeddings", False) or text.tie_word_embeddings),
                  pad_token_id=d.get("pad_token_id"), dtype=d.get("dtype", d.get("torch_dtype")))
        text.tie_word_embeddings = cfg.tie_word_embeddings
        n_states = vision.num_hidden_layers + 1  # embeddings + one per layer
        for layer in cfg.feature_layers:
            if not isinstance(layer, int) or not -n_states <= layer < n_states:
                raise ConfigError(f"{source}: vision_feature_layer: {layer!r} out of range for "
                                  f"{n_states} hidden states")
        return cfg

    def to_dict(self) -> dict:
        """HF layout of config.json (model_type "llava"); LlavaConfig.from_dict reads it back."""
        out = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
               "image_seq_length": self.num_image_tokens, **dataclasses.asdict(self)}  # every field, under its name
        v, t = out["vision_config"], out["text_config"]
        if self.vision_config.model_type == "siglip_vision_model":
            v.pop("projection_dim")
            v["vision_use_head"] = False  # we do not keep SigLIP's pooling head (LLaVA never uses it)
        t["rope_parameters"] = {"rope_theta": float(t.pop("rope_theta")), "rope_type": "default"}
        if t["model_type"] == "qwen2":
            del t["attention_bias"], t["mlp_bias"]  # fixed by the architecture, not config fields
        t["tie_word_embeddings"] = self.tie_word_embeddings
        return {k: x for k, x in out.items() if x is not None}  # pad_token_id and dtype only when known


# -------------------------------------------------------------------- sub-config readers
def _pick(cls, d: dict, defaults: dict, source: str, prefix: str):
    """Known fields from `d`, else the default of its model_type, else the dataclass's; type-checked."""
    model_type = d.get("model_type", cls.model_type)
    if model_type not in defaults:
        raise ConfigError(f"{source}: {prefix}.model_type: unsupported {model_type!r} "
                          f"(supported: {', '.join(defaults)})")
    merged = {**defaults[model_type], **d}
    kwargs = {f.name: merged[f.name] for f in dataclasses.fields(cls) if f.name in merged}
    for name, value in kwargs.items():
        if isinstance(value, (dict, str)) and name not in ("model_type", "hidden_act"):
            raise ConfigError(f"{source}: {prefix}.{name}: expected a number, got {value!r}")
    return kwargs


def _read_vision(d: dict, source: str) -> VisionConfig:
    kw = _pick(VisionConfig, d, VISION_DEFAULTS, source, "vision_config")
    for key in ("image_size", "patch_size"):
        if isinstance(kw.get(key), (list, tuple)):  # [S, S] is allowed by transformers; we need square
            if len(set(kw[key])) != 1:
                raise ConfigError(f"{source}: vision_config.{key}: only square sizes are supported, got {kw[key]}")
            kw[key] = kw[key][0]
    if kw["hidden_act"] not in VISION_ACTS:  # both model_types' defaults name one
        raise ConfigError(f"{source}: vision_config.hidden_act: unsupported {kw['hidden_act']!r}")
    return VisionConfig(**kw)


def _read_text(d: dict, source: str) -> TextConfig:
    kw = _pick(TextConfig, d, TEXT_DEFAULTS, source, "text_config")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{source}: text_config.rope_parameters.rope_type: unsupported {rope_type!r} "
                          "(only 'default')")
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if d.get("use_sliding_window"):
        raise ConfigError(f"{source}: text_config.use_sliding_window: sliding-window attention is not supported")
    cfg = TextConfig(**kw)
    if cfg.hidden_act != "silu":
        raise ConfigError(f"{source}: text_config.hidden_act: unsupported {cfg.hidden_act!r} (only 'silu')")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"{source}: text_config.num_key_value_heads: {cfg.num_key_value_heads} does not divide "
                          f"num_attention_heads {cfg.num_attention_heads}")
    return cfg
