"""Decoding any input to the right RGB tensor, the paper's preprocessing, and clear errors for bad inputs."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from fastpadim import images
from fastpadim.errors import FastpadimError, ImageError
from fastpadim.images import (ImageTooLarge, Preprocessing, iter_batches, list_images, load_one, open_image, read_size,
                              set_max_image_pixels)

COLOUR = (200, 40, 90)


def rgb_of(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def halves(size=(64, 48)) -> np.ndarray:
    """Left half red, right half blue (W x H = size)."""
    w, h = size
    array = np.zeros((h, w, 3), np.uint8)
    array[:, : w // 2] = (255, 0, 0)
    array[:, w // 2 :] = (0, 0, 255)
    return array


# ------------------------------------------------------------------------------------------ file modes
def test_rgb_png(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    np.testing.assert_array_equal(rgb_of(open_image(tmp_path / "a.png")), array)


def test_grayscale_becomes_equal_channels(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = rgb_of(open_image(str(tmp_path / "g.png")))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_16bit_png_is_scaled_to_8_bit(tmp_path):
    values = np.array([0, 257, 32896, 65535, 1000], np.uint16)
    array16 = np.resize(values, (40, 40)).astype(np.uint16)
    Image.fromarray(array16).save(tmp_path / "d.png")  # a 16-bit grayscale PNG (I;16)
    with Image.open(tmp_path / "d.png") as check:
        assert check.mode in ("I;16", "I")  # really 16-bit on disk
    out = rgb_of(open_image(tmp_path / "d.png"))
    expected = np.rint(array16 / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_rgba_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = COLOUR
    rgba[:, :20, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "t.png")
    out = rgb_of(open_image(tmp_path / "t.png"))
    assert (out[:, :20] == COLOUR).all()
    assert (out[:, 20:] == 0).all()


def test_palette_image_uses_its_colours(tmp_path):
    image = Image.fromarray(halves((40, 40))).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert image.mode == "P"
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(rgb_of(open_image(tmp_path / "p.png")), halves((40, 40)))


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = halves((64, 48))  # 64 wide, 48 tall; left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = rgb_of(open_image(tmp_path / "r.jpg"))
    assert out.shape == (64, 48, 3)  # width and height swapped
    top, bottom = out[:24].reshape(-1, 3).mean(0), out[40:].reshape(-1, 3).mean(0)
    # After a clockwise quarter turn the stored left (red) part is on top, the right (blue) part below.
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_jpeg(tmp_path):
    Image.new("RGB", (40, 40), COLOUR).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    out = rgb_of(open_image(tmp_path / "c.jpg"))
    assert np.abs(out.reshape(-1, 3).mean(0) - COLOUR).max() < 6


# ----------------------------------------------------------------------------------------- in memory
def test_pil_image_in_memory():
    np.testing.assert_array_equal(rgb_of(open_image(Image.new("L", (40, 40), 77))), np.full((40, 40, 3), 77))


@pytest.mark.parametrize(
    "array,expected",
    [
        (np.full((40, 36, 3), COLOUR, np.uint8), COLOUR),
        (np.full((3, 40, 36), 9, np.uint8), (9, 9, 9)),  # CHW
        (np.full((40, 36), 130, np.uint8), (130, 130, 130)),  # grayscale HW
        (np.full((40, 36, 1), 130, np.uint8), (130, 130, 130)),
        (np.full((40, 36, 3), 257 * 100, np.uint16), (100, 100, 100)),  # 16-bit full range
        (np.full((40, 36, 3), 0.5, np.float32), (128, 128, 128)),  # floats in 0..1
        (np.full((40, 36, 3), 0.2, np.float64), (51, 51, 51)),
    ],
    ids=["uint8-hwc", "uint8-chw", "uint8-hw", "uint8-hw1", "uint16", "float32", "float64"],
)
def test_numpy_arrays(array, expected):
    out = rgb_of(open_image(array))
    assert out.shape == (40, 36, 3)
    assert (out == expected).all()


def test_rgba_array_composites_on_black():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = COLOUR
    rgba[:20, :, 3] = 255
    out = rgb_of(open_image(rgba))
    assert (out[:20] == COLOUR).all() and (out[20:] == 0).all()


@pytest.mark.parametrize(
    "tensor,expected",
    [
        (torch.full((3, 40, 36), 0.25), (64, 64, 64)),  # CHW float in 0..1, as torchvision gives
        (torch.full((40, 36, 3), 200, dtype=torch.uint8), (200, 200, 200)),
        (torch.full((1, 40, 36), 1.0), (255, 255, 255)),
    ],
    ids=["float-chw", "uint8-hwc", "float-1hw"],
)
def test_torch_tensors(tensor, expected):
    out = rgb_of(open_image(tensor))
    assert out.shape == (40, 36, 3)
    assert (out == expected).all()


def test_tensor_is_normalised_with_the_backbone_statistics():
    """The network's input: resized/cropped view, scaled to 0..1, minus mean, over std, in CHW order."""
    pre = Preprocessing(40, None, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))
    item = load_one(np.full((40, 40, 3), COLOUR, np.uint8), 0, pre, keep_view=True)
    assert item.error is None and item.tensor.shape == (3, 40, 40) and item.tensor.dtype == torch.float32
    expected = (np.array(COLOUR) / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    np.testing.assert_allclose(item.tensor.mean(dim=(1, 2)).numpy(), expected, rtol=1e-5)
    assert item.view.shape == (40, 40, 3) and item.view.dtype == np.uint8


# -------------------------------------------------------------------------------------- preprocessing
def test_resize_then_centre_crop():
    pre = Preprocessing(256, 224)
    assert pre.output_size == (224, 224)
    array = np.zeros((300, 300, 3), np.uint8)
    array[150:, :] = 255  # lower half white
    view = np.asarray(pre.geometry(open_image(array)))
    assert view.shape == (224, 224, 3)
    assert view[:100].max() == 0 and view[124:].min() == 255
    mask = Image.fromarray(((np.arange(300)[:, None] >= 150) * np.ones((1, 300)) * 255).astype(np.uint8))
    mask_view = np.asarray(pre.mask_geometry(mask))
    assert mask_view.shape == (224, 224) and set(np.unique(mask_view)) == {0, 255}


def test_resize_only():
    pre = Preprocessing(96, None)
    assert pre.output_size == (96, 96)
    assert pre.geometry(Image.new("RGB", (200, 200))).size == (96, 96)
    with pytest.raises(ImageError, match="200x120 .* would be squashed into this model's 96x96 input"):
        pre.geometry(Image.new("RGB", (200, 120)))  # another shape: refused, never stretched silently
    squashing = Preprocessing(96, None, squash=True)
    assert squashing.geometry(Image.new("RGB", (200, 120))).size == (96, 96)
    assert Preprocessing.from_dict(pre.to_dict()) == pre and Preprocessing.from_dict(squashing.to_dict()) == squashing
    rect = Preprocessing((48, 80), (32, 64))
    assert rect.output_size == (32, 64) and rect.geometry(Image.new("RGB", (160, 96))).size == (64, 32)
    assert rect.to_dict()["image_size"] == [48, 80] and Preprocessing.from_dict(rect.to_dict()) == rect


@pytest.mark.parametrize("image_size,crop", [(16, None), (64, 80), (64, 8)])
def test_bad_preprocessing_sizes(image_size, crop):
    with pytest.raises(FastpadimError):
        Preprocessing(image_size, crop)


# ----------------------------------------------------------------------------------------- bad inputs
def assert_one_line(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_too_small_image(tmp_path):
    Image.new("RGB", (20, 50)).save(tmp_path / "small.png")
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "small.png")
    assert_one_line(info, "small.png", "20x50", "at least 32")
    with pytest.raises(ImageError, match="at least 32"):
        open_image(np.zeros((10, 10, 3), np.uint8))


def test_truncated_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "cut.png")
    assert_one_line(info, "cut.png", "truncated")


def test_truncated_jpeg(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.jpg")
    data = (tmp_path / "f.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "cut.jpg")
    assert_one_line(info, "cut.jpg")


def test_non_image_file(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "notes.png")
    assert_one_line(info, "notes.png", "not an image")


def test_directory_and_missing_file(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "folder.png")
    assert_one_line(info, "directory")
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "absent.png")
    assert_one_line(info, "no such file")


@pytest.mark.parametrize("bad", [np.zeros((4, 40, 40, 3), np.uint8), np.zeros((40, 40, 5), np.uint8),
                                 np.zeros((40, 40, 3), np.int64), 42])
def test_unusable_objects(bad):
    with pytest.raises(ImageError):
        open_image(bad)


# -------------------------------------------------------------------------------------------- folders
def test_list_images_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.bmp"):
        Image.new("RGB", (40, 40)).save(tmp_path / name, format="PNG")
    (tmp_path / "readme.txt").write_text("x")
    files = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.JPG", "b.png", "sub/c.bmp"]
    assert list_images(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_list_images_errors(tmp_path):
    with pytest.raises(FastpadimError, match="no such file or folder"):
        list_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastpadimError, match="no images found"):
        list_images(tmp_path / "empty")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("x")
    (tmp_path / "docs/b.csv").write_text("y")
    with pytest.raises(FastpadimError, match="no images found"):
        list_images(tmp_path / "docs")


def test_batches_keep_order_and_carry_errors(tmp_path):
    (tmp_path / "bad.png").write_text("nope")
    items = [np.full((40, 40, 3), i, np.uint8) for i in range(5)]
    items.insert(2, tmp_path / "bad.png")
    batches = list(iter_batches(items, Preprocessing(40, None), batch_size=4, workers=2))
    assert [len(b) for b in batches] == [4, 2]
    flat = [item for batch in batches for item in batch]
    assert [item.index for item in flat] == list(range(6))
    assert flat[2].error and "bad.png" in flat[2].error and flat[2].tensor is None
    assert all(item.error is None and item.tensor is not None for i, item in enumerate(flat) if i != 2)
    with pytest.raises(FastpadimError, match="batch size"):
        list(iter_batches(items, Preprocessing(40, None), batch_size=0))


# ------------------------------------------------------------------------------- decoder failures of any kind
def dds_garbage() -> bytes:
    """A DDS header with a pixel format Pillow does not know, then garbage: Pillow raises NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + bytes(44) + struct.pack("<4I", 32, 0x40000000, 0, 0)
    return b"DDS " + header + bytes(128 - 4 - len(header)) + b"\xde\xad\xbe\xef" * 64


def test_any_decoder_exception_is_one_image_error(tmp_path):
    with pytest.raises(NotImplementedError):  # what Pillow itself does with these bytes
        Image.open(io.BytesIO(dds_garbage()))
    (tmp_path / "x.png").write_bytes(dds_garbage())
    with pytest.raises(ImageError) as info:
        open_image(tmp_path / "x.png")
    assert_one_line(info, "x.png", "cannot decode", "NotImplementedError")
    items = [np.full((40, 40, 3), 9, np.uint8), tmp_path / "x.png", np.full((40, 40, 3), 7, np.uint8)]
    (batch,) = list(iter_batches(items, Preprocessing(40, None), batch_size=3))
    assert [item.error is None for item in batch] == [True, False, True]
    assert "x.png" in batch[1].error and "NotImplementedError" in batch[1].error


def test_memory_error_is_not_an_image_error(monkeypatch):
    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(MemoryError):
        open_image(png_bytes(np.zeros((40, 40, 3), np.uint8)))


def test_empty_bytes_are_an_image_error():
    with pytest.raises(ImageError, match="e.png: empty file"):
        open_image(b"", name="e.png")


# ------------------------------------------------------------------------------------------ pixel limit
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with no pixel data behind it: only a header check can refuse
    it with the size; decoding would fail as truncated."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 100)))


def png_bytes(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch, tmp_path):
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    assert images.MAX_IMAGE_PIXELS == 40_000_000
    with pytest.raises(ImageTooLarge) as info:
        open_image(png_header_only(9000, 9000), name="huge.png")
    assert str(info.value) == ("huge.png: 9000x9000 = 81.0 MP is above the limit of 40 MP; downscale the image or "
                               "raise the pixel limit (--max-pixels)")
    (tmp_path / "huge.png").write_bytes(png_header_only(9000, 9000))
    with pytest.raises(ImageTooLarge, match="81.0 MP"):
        read_size(tmp_path / "huge.png")
    item = load_one(tmp_path / "huge.png", 0, Preprocessing(64, None), keep_view=False)
    assert item.array is None and "above the limit of 40 MP" in item.error
    assert loads == []  # refused from the header: nothing was decoded
    # Just below the limit the header passes and the (missing) pixel data is what fails.
    with pytest.raises(ImageError, match="truncated"):
        open_image(png_header_only(8000, 5000))
    assert loads == [(8000, 5000)]


def test_pixel_limit_can_be_changed(tmp_path):
    data = png_bytes(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageTooLarge, match="100x100 = 0.01 MP is above the limit of 0.005 MP"):
        open_image(data, name="a.png", max_pixels=5000)
    assert read_size(data, max_pixels=10_000) == (100, 100)
    previous = set_max_image_pixels(9999)
    try:
        assert previous == 40_000_000
        with pytest.raises(ImageTooLarge):
            open_image(data)
        (tmp_path / "a.png").write_bytes(data)
        (batch,) = list(iter_batches([tmp_path / "a.png"], Preprocessing(64, None), batch_size=1))
        assert "above the limit" in batch[0].error
        (batch,) = list(iter_batches([tmp_path / "a.png"], Preprocessing(64, None), batch_size=1, max_pixels=10_000))
        assert batch[0].error is None
    finally:
        set_max_image_pixels(previous)
    assert open_image(data).size == (100, 100)
    for bad in (0, 1000, 10**12, 4.5e7, "40", True):
        with pytest.raises(FastpadimError, match="--max-pixels"):
            set_max_image_pixels(bad)
    assert images.MAX_IMAGE_PIXELS == 40_000_000


def test_pillow_warnings_and_limits_do_not_leak():
    # Above Pillow's warning threshold (89 MP) and above its hard limit (179 MP): one refusal in our words, no warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # as a user's script: shown once; fastpadim's filter goes in front of it
        for width, height, words in ((10_000, 9_500, "10000x9500 = 95.0 MP"), (20_000, 20_000, "400.0 MP")):
            with pytest.raises(ImageTooLarge) as info:
                open_image(png_header_only(width, height), name="big.png")
            assert_one_line(info, "big.png", words, "above the limit of 40 MP")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ------------------------------------------------------------------------------- reduced decoding (JPEG)
def test_large_jpeg_is_decoded_at_reduced_scale_png_in_full(tmp_path):
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC))  # smooth, 1600x1200
    jpeg = png_bytes(array, "JPEG", quality=95)
    full = open_image(jpeg)
    reduced = open_image(jpeg, reduce_to=256)
    assert full.size == (1600, 1200)
    assert reduced.size == (400, 300)  # 1/4: the largest power of two that stays at least 256 on both sides
    assert open_image(jpeg, reduce_to=700).size == (1600, 1200)  # less than twice the target: decoded in full
    pre = Preprocessing((192, 256), (168, 224))  # the frames' 4:3
    item = load_one(jpeg, 0, pre, keep_view=False)
    assert item.array.shape == (3, 168, 224)
    level = 255 * min(pre.std)  # normalised units back to grey levels (at most)
    difference = np.abs(item.array - pre.normalize_array(np.asarray(pre.geometry(full)))) * level
    assert difference.mean() < 2.0 and difference.max() < 40  # the same picture as the full decode
    kept = load_one(jpeg, 0, pre, keep_view=True)  # a kept frame is the frame, decoded in full
    assert kept.view.shape == (1200, 1600, 3)
    # PNG has no reduced decoding: the result is bit-identical to decoding it in full.
    png = png_bytes(array)
    assert open_image(png, reduce_to=256).size == (1600, 1200)
    item = load_one(png, 0, pre, keep_view=False)
    expected = pre.normalize_array(np.asarray(pre.geometry(Image.open(io.BytesIO(png)).convert("RGB"))))
    np.testing.assert_array_equal(item.array, expected)


def test_exif_rotated_large_jpeg_at_reduced_scale_is_upright():
    stored = np.asarray(Image.fromarray(halves((64, 48))).resize((1024, 768), Image.Resampling.NEAREST))
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = png_bytes(stored, "JPEG", exif=exif, quality=95)
    out = rgb_of(open_image(jpeg, reduce_to=128))
    assert out.shape == (256, 192, 3)  # 1/4 scale, width and height swapped
    assert (out[:100, :, 0] > 200).all() and (out[-100:, :, 2] > 200).all()  # red on top, blue below


def test_read_size_is_the_size_as_decoded_after_an_exif_quarter_turn():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 64x48 JPEG is shown 48x64
    jpeg = png_bytes(np.zeros((48, 64, 3), np.uint8), "JPEG", exif=exif)
    assert read_size(jpeg) == open_image(jpeg).size == (48, 64)
    assert read_size(png_bytes(np.zeros((48, 64, 3), np.uint8))) == (64, 48)
