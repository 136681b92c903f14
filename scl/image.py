"""Image -> pixel_values, in Pillow + numpy, equal to transformers' processors (tests/test_image.py).

    clip  : RGB -> resize shortest edge (bicubic) -> centre crop -> *1/255 -> (x - mean) / std
    siglip: RGB -> resize to (size, size) (bicubic)         -> *1/255 -> (x - 0.5) / 0.5
Optional pad-to-square first, as the original LLaVA-1.5 (`image_aspect_ratio: pad`): the image on a
square of the mean colour, so nothing is cropped away.
"""
import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def open_image(src):
    """A path or bytes -> a fully decoded RGB image (a corrupt file fails now, not mid-batch): the one
    opener of every stage, so a model is trained on the pixels it answered about."""
    with Image.open(src if isinstance(src, (str, os.PathLike)) else io.BytesIO(src)) as im:
        im.load()
        return to_rgb(im)


def to_rgb(image):
    """RGB the way transformers converts: transparency is composited onto white, not dropped
    (a plain PIL .convert("RGB") would show whatever colour hides under alpha 0)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    size: object = 224  # HF spec: int / {"shortest_edge": n} (CLIP) / {"height", "width"} (SigLIP)
    crop_size: object = 224  # centre crop, int or {"height", "width"}; used when do_center_crop
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    resample: int = 3  # PIL bicubic
    pad_to_square: bool = False  # original LLaVA-1.5: pad with the mean colour before resizing

    @classmethod
    def clip(cls, image_size=224, **kw):
        return cls(size={"shortest_edge": image_size}, crop_size=image_size, **kw)

    @classmethod
    def siglip(cls, image_size=224, **kw):
        return cls(size={"height": image_size, "width": image_size}, do_center_crop=False,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kw)

    @classmethod
    def from_dict(cls, d):
        """From a HF image-processor dict; defaults by class, as transformers' class attributes."""
        base = cls.siglip() if (d.get("image_processor_type") or "").lower().startswith("siglip") else cls.clip()
        for name in ("size", "crop_size", "do_resize", "do_center_crop", "do_rescale", "do_normalize",
                     "rescale_factor", "resample"):
            if d.get(name) is not None:
                setattr(base, name, d[name])
        for name in ("image_mean", "image_std"):  # a list, or one number for all three channels
            if d.get(name) is not None:
                setattr(base, name, tuple(d[name]) if isinstance(d[name], (list, tuple)) else (d[name],) * 3)
        base.pad_to_square = bool(d.get("do_pad", False) or d.get("image_aspect_ratio") == "pad")
        return base

    @classmethod
    def from_dir(cls, path):
        """preprocessor_config.json (Hub layout), else processor_config.json (transformers 5.x, maybe nested)."""
        for name in ("preprocessor_config.json", "processor_config.json"):
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    d = json.load(f)
                return cls.from_dict(d if name.startswith("pre") else d.get("image_processor", d))
        raise FileNotFoundError(f"{path}: neither preprocessor_config.json nor processor_config.json")

    @classmethod
    def from_config(cls, cfg):
        """A VLMConfig's vision tower's own recipe at its image_size, for a folder without processor files."""
        v = cfg.vision_config
        return (cls.siglip if v.model_type == "siglip_vision_model" else cls.clip)(v.image_size)

    # ------------------------------------------------------------------------- the recipe

    def _resize_hw(self, w, h):
        if isinstance(self.size, dict) and "shortest_edge" not in self.size:
            return int(self.size["height"]), int(self.size["width"])
        # An int is a shortest edge: both CLIP and SigLIP processors have default_to_square=False.
        edge = int(self.size if isinstance(self.size, int) else self.size["shortest_edge"])
        # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
        return (int(edge * h / w), edge) if w <= h else (edge, int(edge * w / h))

    def _center_crop(self, x):  # x (H, W, 3) uint8
        c = self.crop_size
        ch, cw = (c, c) if isinstance(c, int) else (int(c["height"]), int(c["width"]))
        # Smaller than the crop: transformers pads with zeros around (the odd pixel on top/left), then crops.
        dh, dw = max(ch - x.shape[0], 0), max(cw - x.shape[1], 0)
        x = np.pad(x, ((math.ceil(dh / 2), dh // 2), (math.ceil(dw / 2), dw // 2), (0, 0)))
        top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
        return x[top:top + ch, left:left + cw]

    def preprocess(self, image):
        """One PIL image -> (3, S, S) float32 numpy."""
        image = to_rgb(image)
        if self.pad_to_square:
            # LLaVA's expand2square: centred on a square of the mean colour, truncated: int(0.4814 * 255) = 122.
            w, h = image.size
            side = max(w, h)
            square = Image.new("RGB", (side, side), tuple(int(m * 255) for m in self.image_mean))
            square.paste(image, ((side - w) // 2, (side - h) // 2))
            image = square
        if self.do_resize:
            h, w = self._resize_hw(*image.size)
            image = image.resize((w, h), resample=self.resample)
        x = np.asarray(image)  # (H, W, 3) uint8
        if self.do_center_crop:
            x = self._center_crop(x)
        # transformers rescales in float64 then casts, and normalizes in float32; same here.
        x = (x.astype(np.float64) * self.rescale_factor if self.do_rescale else x).astype(np.float32)
        if self.do_normalize:
            x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)

    def __call__(self, images):
        """A PIL image or a list of them -> pixel_values (B, 3, S, S) float32 tensor."""
        if isinstance(images, Image.Image):
            images = [images]
        return torch.from_numpy(np.stack([self.preprocess(im) for im in images]))  # (B, 3, S, S)
