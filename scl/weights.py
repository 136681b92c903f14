"""Checkpoint folders in Hugging Face format: `load_vlm` reads them, `save_vlm` writes them.

Every key is accounted for: used, or dropped for a stated reason; every parameter filled, shapes equal.
Anything else is a one-line `CheckpointError`: a half-loaded model running on random weights is the
worst failure a loader can have.
"""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from scl.config import ConfigError, VLMConfig
from scl.files import MODEL_FILES, atomic_write, write_json, write_text
from scl.image import ImageProcessor
from scl.tokenizer import CHAT_TEMPLATES, Tokenizer
from scl.vlm import VLM


class CheckpointError(ValueError):
    """A checkpoint folder we cannot load exactly; the one-line message names the file and the key."""


# Applied in order, first match of each rule. The four layouts: (a) the llava-hf repos on the Hub:
# `language_model.model.*`, `language_model.lm_head`, `vision_tower.vision_model.*`, `multi_modal_projector.*`;
# (b) transformers 5.x in memory: `model.language_model.*`, `lm_head`, `model.vision_tower.*`, `model.multi_...`;
# (c) what transformers 5.24 saves for a model built from scratch: (a) without `vision_model.`;
# (d) transformers 4.52-5.5 in memory: (b) with `vision_model.`.
RENAMES = [
    (r"^model\.language_model\.", "language_model.model."),  # (b), (d): transformers' in-memory names
    (r"^lm_head\.", "language_model.lm_head."),  # (b), (d)
    (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1."),  # (b), (d)
    (r"^vision_tower\.vision_model\.", "vision_tower."),  # (a), (d): the CLIP wrapper transformers 5.6 removed
]
# Checkpoint tensors we knowingly do not use (matched against canonical names), with the reason.
DROPPED = [
    (r"\.position_ids$", "an index buffer older files stored; we use arange"),
    (r"\.rotary_emb\.inv_freq$", "RoPE frequencies are recomputed from rope_theta"),
    (r"^vision_tower\.head\.", "SigLIP's attention-pooling head; LLaVA reads hidden states, never the head"),
]
# Parameters a checkpoint may lack: post_layernorm is never applied by LLaVA (scl/vision.py), and some
# exports strip it. It keeps LayerNorm's identity init so a re-save stays loadable by transformers.
OPTIONAL = r"^vision_tower\.post_layernorm\."


def canonical_name(key: str) -> str:
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key, count=1)
    return key


def hub_name(name: str) -> str:
    """Our name -> layout (a): only the vision tower differs (the `vision_model.` level)."""
    return re.sub(r"^vision_tower\.", "vision_tower.vision_model.", name, count=1)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _shards(path: Path) -> tuple[list[Path], Path]:
    """The safetensors files to read, and the file to name when a key is missing."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot read weight_map ({type(e).__name__}: {_one_line(e)})") from None
        for key, shard in weight_map.items():
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: shard {shard!r} listed for key {key!r} does not exist")
        return [path / shard for shard in dict.fromkeys(weight_map.values())], index
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single], single


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({_one_line(e)})") from None


def load_vlm(path, dtype: torch.dtype = torch.float32, device="cpu") -> VLM:
    """Folder -> VLM in eval mode, every parameter from the checkpoint, cast to `dtype` on `device`."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found (is {path} a checkpoint folder?)")
    try:
        config = VLMConfig.from_file(config_file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):  # shapes only: nothing is allocated twice for a 7B model
        model = VLM(config)
    expected, state = model.state_dict(), {}
    shards, index = _shards(path)
    for file in shards:
        for key, tensor in _read(file).items():
            name = canonical_name(key)
            if any(re.search(p, name) for p, _ in DROPPED):
                continue
            if name == "language_model.lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the head is embed_tokens; some tied checkpoints store a copy
            if name not in expected:
                alias = f" (read as {name!r})" if name != key else ""
                raise CheckpointError(f"{file}: unexpected key {key!r}{alias}: not in the model config.json describes")
            if name in state:
                raise CheckpointError(f"{file}: key {key!r} appears twice (as {name!r})")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, config.json implies "
                                      f"{tuple(expected[name].shape)}")
            state[name] = tensor.to(device=device, dtype=dtype)
    missing = [n for n in expected if n not in state and not re.search(OPTIONAL, n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{index}: missing key {missing[0]!r}{more}")
    for name in expected.keys() - state.keys():  # optional post_layernorm: identity LayerNorm
        fill = torch.ones if name.endswith("weight") else torch.zeros
        state[name] = fill(expected[name].shape, dtype=dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_model_dir(path: str, dtype=torch.float32, device="cpu"):
    """(model, tokenizer, image processor) of a model folder."""
    model = load_vlm(path, dtype=dtype, device=device)
    own = any((Path(path) / f).exists() for f in ("preprocessor_config.json", "processor_config.json"))
    return model, Tokenizer.from_dir(path), (ImageProcessor.from_dir(path) if own else
                                             ImageProcessor.from_config(model.config))


# -------------------------------------------------------------------- saving
def save_vlm(model: VLM, path) -> None:
    """Write `model` as a Hub-layout (a) folder, the one transformers >= 4.52 loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {hub_name(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    (path / "model.safetensors.index.json").unlink(missing_ok=True)  # an older sharded save would shadow the new file
    write_json(path / "config.json", {**model.config.to_dict(), "dtype": dtype})
    text = model.config.text_config
    gen = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
           "pad_token_id": model.config.pad_token_id}
    write_json(path / "generation_config.json", {k: v for k, v in gen.items() if v is not None})


def save_processor(path, config: VLMConfig) -> None:
    """Write processor_config.json and chat_template.jinja beside a folder's tokenizer and image recipe,
    so that transformers' AutoProcessor gives render_chat's ids and our pixels."""
    path = Path(path)
    if not (path / "preprocessor_config.json").is_file():
        # else our ImageProcessor.from_dir would read processor_config.json as the image recipe
        raise FileNotFoundError(f"{path / 'preprocessor_config.json'}: missing; save_processor needs the image recipe")
    tok = Tokenizer.from_dir(path)  # the tokenizer transformers will load with it
    vision = config.vision_config
    write_json(path / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": tok.image_token, "patch_size": vision.patch_size,
        "num_additional_image_tokens": int(vision.has_class_token),
        "vision_feature_select_strategy": config.vision_feature_select_strategy})
    write_text(path / "chat_template.jinja", CHAT_TEMPLATES[tok.chat_format])
    (path / "chat_template.json").unlink(missing_ok=True)  # transformers reads it before chat_template.jinja


def copy_processor_files(src, dst) -> None:
    """Copy the tokenizer, processor and chat-template files of model folder `src` into `dst`."""
    for name in MODEL_FILES[1:] + ("special_tokens_map.json",):
        if (Path(src) / name).exists():
            atomic_write(Path(dst) / name, lambda tmp, n=name: shutil.copyfile(Path(src) / n, tmp))
