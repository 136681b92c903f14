"""Training checkpoints: atomic writes, the last and the best kept, exact resume.

A checkpoint is a folder `step_XXXXXX/` holding `trainable.safetensors` (only the parameters that
train: LoRA adapters, or everything for full fine-tuning) and `state.pt` (optimizer, step, RNG
states, counters). It is written under a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact (DESIGN §4). `state.pt` is our own file and is read with
`weights_only=True` all the same (DESIGN §7).
"""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def _atomic_dir(final: str, write) -> None:
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    old = final + ".old"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: str, trainable: dict, state: dict) -> None:
    """Write `path/` atomically: trainable tensors + a state dict (optimizer, step, RNG, ...)."""
    def write(tmp):
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    _atomic_dir(path, write)


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """Read what save_checkpoint wrote: (trainable tensors, state)."""
    trainable = load_file(os.path.join(path, "trainable.safetensors"))
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location="cpu")
    return trainable, state


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
