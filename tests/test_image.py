"""Image preprocessing equals transformers' SiglipImageProcessor (its Pillow backend) on the same images, in
every mode a file may have; reading refuses a decompression bomb with a one-line error naming the file."""

import base64
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

from lmforge.vision.image import (  # noqa: E402
    ImageError,
    ImageProcessorConfig,
    preprocess,
    read_image,
    read_image_url,
)


def images():
    """Random pixels in the modes files come in; odd, non-square and tiny sizes."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA")  # partial transparency
    grey = Image.fromarray(rng.integers(0, 256, (90, 17), dtype=np.uint8), "L")
    palette = rgb.convert("P")
    palette.info["transparency"] = 3  # a palette entry that is transparent (GIF, PNG)
    return {"RGB": rgb, "RGBA": rgba, "L": grey, "LA": rgba.convert("LA"), "P": palette,
            "1x1": Image.new("RGB", (1, 1), (9, 99, 199)), "large": rgb.resize((500, 300))}


@pytest.mark.parametrize("size", [32, 64, 224])
def test_equals_siglip_image_processor(size):
    hf = SiglipImageProcessorPil(size={"height": size, "width": size})
    cfg = ImageProcessorConfig.from_hf(hf.to_dict())
    assert cfg == ImageProcessorConfig(size=size)
    for name, image in images().items():
        expected = hf(images=[image], return_tensors="pt")["pixel_values"]
        got = preprocess([image], cfg)
        assert got.shape == (1, 3, size, size) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


def test_files_read_and_preprocess_as_transformers_does(tmp_path):
    """Through a file: PNG keeps every mode (a palette's transparency too), JPEG loses alpha; read_image then
    preprocess equals the processor on Image.open of the same file."""
    hf = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    for name, image in images().items():
        for suffix in (".png", ".jpg") if image.mode in ("RGB", "L") else (".png",):
            path = tmp_path / f"{name}{suffix}"
            image.save(path)
            with Image.open(path) as opened:
                expected = hf(images=[opened], return_tensors="pt")["pixel_values"]
            got = preprocess([read_image(path)], ImageProcessorConfig(size=32))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=path.name)


def test_unsupported_processor_settings():
    with pytest.raises(ImageError, match="do_center_crop"):
        ImageProcessorConfig.from_hf({"size": {"height": 8, "width": 8}, "do_center_crop": True})
    with pytest.raises(ImageError, match="square"):
        ImageProcessorConfig.from_hf({"size": {"shortest_edge": 8}})


def png_header(path, width, height):
    """A PNG that declares width x height pixels but holds almost no data: what a bomb looks like to a reader."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_read_image_refuses_bombs_and_junk(tmp_path):
    ok = tmp_path / "ok.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(ok)
    assert read_image(ok).size == (20, 10)
    assert read_image(ok.read_bytes()).size == (20, 10)
    for width, height, limit in ((30000, 30000, None), (8000, 8000, None), (20, 10, 100)):
        bomb = png_header(tmp_path / f"bomb{width}.png", width, height)
        with pytest.raises(ImageError) as error:
            read_image(bomb if limit is None else ok, **({} if limit is None else {"max_pixels": limit}))
        message = str(error.value)
        assert "\n" not in message and str(bomb if limit is None else ok) in message
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="junk.png: not a readable image"):
        read_image(junk)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (5, 5, 5)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageError, match="truncated.png"):
        read_image(truncated)
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")


def test_read_image_url(tmp_path):
    Image.new("RGB", (6, 4), (1, 2, 3)).save(tmp_path / "a.png")
    data = "data:image/png;base64," + base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    for url, base in ((data, None), ("a.png", tmp_path), (str(tmp_path / "a.png"), None),
                      (f"file://{tmp_path / 'a.png'}", None)):
        assert read_image_url(url, base).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError, match="not valid base64"):
        read_image_url("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="data URL"):
        read_image_url("data:image/png;base64," + base64.b64encode(b"junk").decode())
    with pytest.raises(ImageError, match="web URLs"):
        read_image_url("https://example.com/a.png")
