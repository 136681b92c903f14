"""ImageProcessor == transformers' CLIP / SigLIP / LLaVA image processors.

Compared against the PIL backend classes (`*ImageProcessorPil`), which is what transformers 5.24
uses when torchvision is absent, as here; the torchvision backend may resize slightly differently.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from scl.config import VLMConfig
from scl.image import ImageProcessor, to_rgb

transformers = pytest.importorskip("transformers")

SIZES = [(40, 30), (30, 57), (13, 9), (333, 200), (64, 64)]  # (W, H): wide, tall, tiny, large, square
MODES = ["RGB", "RGBA", "L"]


def make_image(w, h, mode, seed=0):
    a = np.random.default_rng(seed + w * 7 + h).integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(a, "RGBA")
    im = Image.fromarray(a[..., :3], "RGB")
    return im.convert("L") if mode == "L" else im


def hf_pixels(proc, im):
    assert proc.backend == "pil"  # the backend we compare against (no torchvision installed)
    return proc(im, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("side", [28, 336])
def test_clip_matches_transformers(w, h, mode, side):
    im = make_image(w, h, mode)
    ref = hf_pixels(transformers.CLIPImageProcessorPil(size={"shortest_edge": side},
                                                       crop_size={"height": side, "width": side}), im)
    ours = ImageProcessor.clip(side)([im])
    assert ours.shape == ref.shape == (1, 3, side, side) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("side", [28, 384])
def test_siglip_matches_transformers(w, h, mode, side):
    im = make_image(w, h, mode)
    ref = hf_pixels(transformers.SiglipImageProcessorPil(size={"height": side, "width": side}), im)
    ours = ImageProcessor.siglip(side)(im)
    assert ours.shape == ref.shape == (1, 3, side, side)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("w,h", SIZES)
def test_pad_to_square_matches_llava_processor(w, h, mode):
    im = make_image(w, h, mode)
    ref = hf_pixels(transformers.LlavaImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_pad=True), im)
    assert (ImageProcessor.clip(28, pad_to_square=True)(im) - ref).abs().max().item() <= 1e-5


def test_pad_to_square_surrounds_with_the_mean_colour():
    im = Image.new("RGB", (60, 20), (255, 0, 0))  # wide: bands above and below
    proc = ImageProcessor(size={"height": 60, "width": 60}, do_center_crop=False, do_rescale=False,
                          do_normalize=False, pad_to_square=True)
    x = proc(im)[0].permute(1, 2, 0).numpy()  # (60, 60, 3), 0..255
    assert x.shape == (60, 60, 3)
    assert (x[:20] == [122, 116, 104]).all() and (x[40:] == [122, 116, 104]).all()  # int(mean * 255)
    assert (x[20:40] == [255, 0, 0]).all()
    # Without padding the same image is centre-cropped: no mean colour anywhere.
    crop = ImageProcessor.clip(20, do_rescale=False, do_normalize=False)(im)[0]
    assert (crop.permute(1, 2, 0).numpy() == [255, 0, 0]).all()


def test_rgba_transparency_composited_on_white():
    im = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent dark pixels
    assert np.asarray(to_rgb(im)).tolist() == np.full((8, 8, 3), 255).tolist()


def test_batch_of_different_sizes():
    ims = [make_image(w, h, "RGB") for w, h in SIZES]
    out = ImageProcessor.clip(28)(ims)
    assert out.shape == (len(SIZES), 3, 28, 28)
    assert torch.equal(out[2], ImageProcessor.clip(28)(ims[2])[0])


def test_from_dir_hub_and_nested_layouts(tmp_path):
    hub = {"crop_size": {"height": 28, "width": 28}, "do_center_crop": True, "do_convert_rgb": True,
           "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
           "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
           "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 28}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "preprocessor_config.json").write_text(json.dumps(hub))
    im = make_image(40, 30, "RGB")
    assert torch.equal(ImageProcessor.from_dir(tmp_path / "a")(im), ImageProcessor.clip(28)(im))
    # transformers 5.x saves the settings nested in processor_config.json; use its own writer.
    saved = transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    saved.save_pretrained(tmp_path / "b")
    nested = {"image_processor": json.loads((tmp_path / "b" / "preprocessor_config.json").read_text()),
              "patch_size": 7}
    (tmp_path / "b" / "preprocessor_config.json").unlink()
    (tmp_path / "b" / "processor_config.json").write_text(json.dumps(nested))
    ref = hf_pixels(transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28}), im)
    assert (ImageProcessor.from_dir(tmp_path / "b")(im) - ref).abs().max().item() <= 1e-5
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path / "missing")


def test_from_config_defaults():
    def from_config(vision):
        return ImageProcessor.from_config(VLMConfig.from_dict({"vision_config": vision} if vision else {}))

    clip = from_config({"model_type": "clip_vision_model", "image_size": 28})
    assert clip.size == {"shortest_edge": 28} and clip.crop_size == 28 and clip.do_center_crop
    sig = from_config({"model_type": "siglip_vision_model", "image_size": 384})
    assert sig.size == {"height": 384, "width": 384} and not sig.do_center_crop and sig.image_mean == (0.5,) * 3
    assert from_config(None).size == {"shortest_edge": 336}  # LlavaConfig's default tower
