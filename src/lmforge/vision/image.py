"""Images in: reading a file safely, and turning images into a vision tower's pixel values.

Preprocessing is SigLIP's (transformers' `SiglipImageProcessor`, its Pillow backend), step by step:
1. to RGB: an image with transparency is composited onto white first (a transparent pixel would
   otherwise keep whatever colour it happens to store); greyscale and palette images are expanded;
2. resize to size x size with Pillow's bicubic filter, with no crop and no padding: the whole image is
   seen, squeezed if it is not square (so a shape at an edge is never cut off);
3. rescale the 0-255 bytes by 1/255 (in float64, then float32, as transformers does);
4. normalise each channel: (x - mean) / std, with SigLIP's mean = std = 0.5, so pixels lie in [-1, 1].
The same numbers go into the model directory's preprocessor_config.json, so `AutoProcessor` there gives
the same pixel values (tests/test_llava.py compares them).

Chat data names an image by a file path or a base64 data URL (`read_image_url`). Reading is bounded: an
image whose header declares more than `max_pixels` pixels is refused before its data is decoded (a
"decompression bomb": a few kilobytes of PNG that would decode to gigabytes).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image

MAX_PIXELS = 50_000_000  # ~7000 x 7000: far above any useful input, far below what would exhaust memory
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json writes it


class ImageError(ValueError):
    """An image that cannot be read or is refused; the message names the file."""


def pillow():
    """PIL's Image module, imported when an image is first read: Pillow is the `vision` extra, so a text-only
    install runs every command; without it, reading an image is an ImageError saying what to install."""
    try:
        from PIL import Image
    except ImportError:
        raise ImageError("reading images needs Pillow: pip install 'lmforge[vision]'") from None
    return Image


def read_image(source: str | Path | bytes, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open and decode an image file (or its bytes: `name` then says what to call it in errors), refusing
    one that declares more than `max_pixels` pixels before decoding it."""
    label = name or ("image bytes" if isinstance(source, bytes) else str(source))
    Image = pillow()
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > max_pixels:
                raise ImageError(f"{label}: {width}x{height} pixels is over the limit of {max_pixels} "
                                 "(a decompression bomb?)")
            image.load()
            return image.copy()  # closing the file destroys the opened image's data; the copy keeps it
    except (Image.UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{label}: not a readable image ({' '.join(str(e).split())})") from None
    except OSError as e:  # truncated or corrupt data; a missing file keeps its FileNotFoundError
        if isinstance(e, FileNotFoundError):
            raise
        raise ImageError(f"{label}: not a readable image ({' '.join(str(e).split())})") from None


DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)


def read_image_url(url: str, base_dir: str | Path | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image an `image_url` names, as chat data carries them: a `data:image/...;base64,` URL, or a file path
    (`file://` or plain; relative paths from `base_dir`, the data file's folder). Web URLs are not fetched here."""
    if match := DATA_URL.fullmatch(url):
        try:
            data = base64.b64decode(match.group(1), validate=True)
        except binascii.Error:
            raise ImageError(f"{url[:40]}...: not valid base64") from None
        return read_image(data, max_pixels, name=f"{url[:30]}... (a data URL)")
    if url.startswith(("http://", "https://")):
        raise ImageError(f"{url}: web URLs are not read here; give a file or a data URL")
    path = Path(url.removeprefix("file://"))
    return read_image(path if path.is_absolute() or base_dir is None else Path(base_dir) / path, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba, Image = image.convert("RGBA"), pillow()
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessorConfig:
    """What preprocessor_config.json says, in SiglipImageProcessor's field names."""
    size: int = 224  # the square side the images are resized to: the vision tower's image_size
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD

    def to_hf(self) -> dict:
        return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
                "size": {"height": self.size, "width": self.size}, "resample": self.resample, "do_rescale": True,
                "rescale_factor": self.rescale_factor, "do_normalize": True, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std)}

    @classmethod
    def from_hf(cls, d: dict) -> ImageProcessorConfig:
        """Read a SiglipImageProcessor's preprocessor_config.json; anything it would do that this does not
        (a crop, padding, a non-square size) is an error naming the field."""
        size = d.get("size") or {}
        if not (isinstance(size, dict) and size.get("height") == size.get("width") and isinstance(size.get("height"),
                                                                                                  int)):
            raise ImageError(f"preprocessor_config.json: size {size!r:.60} is not a square {{height, width}}")
        for flag in ("do_center_crop", "do_pad"):
            if d.get(flag):
                raise ImageError(f"preprocessor_config.json: {flag} is not supported")
        for flag in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ImageError(f"preprocessor_config.json: {flag} false is not supported")
        return cls(size=size["height"], resample=int(d.get("resample", BICUBIC)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   image_mean=tuple(d.get("image_mean", SIGLIP_MEAN)), image_std=tuple(d.get("image_std", SIGLIP_STD)))


def resize(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """Steps 1 and 2: the image as RGB bytes [size, size, 3], uint8 (a quarter of its pixel values' memory, so
    a data set of images can be held as these and normalised batch by batch)."""
    return np.asarray(to_rgb(image).resize((cfg.size, cfg.size), resample=cfg.resample))


def normalise(images: list[np.ndarray], cfg: ImageProcessorConfig) -> torch.Tensor:
    """Steps 3 and 4: resized RGB bytes -> pixel values [N, 3, size, size], float32."""
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    out = []
    for rgb in images:
        pixels = (rgb.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        out.append(((pixels - mean) / std).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def preprocess(images: list[Image.Image], cfg: ImageProcessorConfig) -> torch.Tensor:
    """Images -> pixel values [N, 3, size, size], float32 (the module docstring's four steps)."""
    return normalise([resize(image, cfg) for image in images], cfg)
