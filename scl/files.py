"""What stages write and read back: atomic writes, JSON Lines, content fingerprints, training checkpoints.

Every output is renamed into place, so a crash leaves the old version or the new one. A stage reuses
earlier output only when the fingerprint of its inputs' *contents* matches.
"""
import hashlib
import json
import os
import shutil
from contextlib import suppress
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: str, write) -> None:
    """write(tmp) creates a file or a folder at `tmp`; it then replaces `path` in one rename."""
    path = os.path.abspath(path)
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if os.path.isdir(path) and not os.path.islink(path):  # a folder cannot be renamed over: move it aside
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str, items) -> None:
    write_text(path, "".join(json.dumps(x) + "\n" for x in items))


def read_jsonl(path: str) -> list[dict]:
    """Lines of a JSONL file we wrote; a last line cut short by a crash is dropped (its work is redone)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            with suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def read_json(path: str):
    """The JSON object in `path`, or None when there is no such file or it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------- fingerprints

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
               "processor_config.json", "chat_template.json", "chat_template.jinja")


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def fingerprint(settings=None, files=(), models=()) -> str:
    """sha256 of some settings, the contents of `files` and the weight, config and tokenizer files of each
    model folder: the same bytes give the same fingerprint wherever they lie."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        h.update(b"\0file\0")
        _hash_file(h, path)
    for folder in models:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors") or name in MODEL_FILES or name == "model.safetensors.index.json":
                h.update(f"\0{name}\0".encode())
                _hash_file(h, os.path.join(folder, name))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- training checkpoints
# A folder: trainable.safetensors (what trains) and state.pt (optimizer, step, RNG, counters), our own
# file, read with weights_only=True all the same: nothing here unpickles arbitrary objects.

def save_checkpoint(path: str, trainable: dict, state: dict) -> None:
    def write(tmp):
        os.makedirs(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    atomic_write(path, write)


def load_checkpoint(path: str) -> tuple[dict, dict]:
    return (load_file(os.path.join(path, "trainable.safetensors")),
            torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location="cpu"))
