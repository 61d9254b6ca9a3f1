"""Preprocessing against the reference fixtures and decoding of ImageNet's oddities.

Tolerances (tests/fixtures/adm_reference/README.md): crops exact (uint8 equality; the fixtures
were made with Pillow 13.0.0, the version pinned in this venv), upsampler inputs 1e-6."""
from __future__ import annotations

import io
import random

import numpy as np
import PIL
import pytest
import torch
from helpers import assert_within, load_fixture
from PIL import Image

from adm.data import center_crop_arr, random_crop_arr, superres_low_res
from adm.data.preprocess import (
    BadImageError,
    check_image,
    decode_image,
    hwc_to_chw,
    read_info,
    to_model_range,
)


def _fixture_images() -> dict[str, Image.Image]:
    f = load_fixture("preprocess.pt")
    return {name: Image.open(io.BytesIO(bytes(v["png"].numpy()))).convert("RGB")
            for name, v in f["images"].items()}


def test_pillow_matches_the_fixtures():
    # A different Pillow may round a level differently; say so loudly rather than fail obscurely.
    assert PIL.__version__.split(".")[0] == load_fixture("preprocess.pt")["pillow_version"].split(".")[0]


def test_center_crop_arr_matches_reference_pixel_for_pixel():
    f = load_fixture("preprocess.pt")
    images = _fixture_images()
    assert len(f["center_crop"]) >= 18
    for case in f["center_crop"]:
        out = center_crop_arr(images[case["image"]], case["image_size"])
        assert out.dtype == np.uint8 and out.shape == tuple(case["out"].shape)
        np.testing.assert_array_equal(out, case["out"].numpy(),
                                      err_msg=f"{case['image']} @ {case['image_size']}")


class RecordingRandom(random.Random):
    """A random.Random that records its randrange calls, to compare with the fixture's draws."""

    def __init__(self, seed):
        super().__init__(seed)
        self.calls = []

    def randrange(self, *args):
        result = super().randrange(*args)
        self.calls.append({"args": list(args), "result": result})
        return result


def test_random_crop_arr_matches_reference_draws_and_pixels():
    f = load_fixture("preprocess.pt")
    images = _fixture_images()
    assert len(f["random_crop"]) >= 20
    for case in f["random_crop"]:
        rng = RecordingRandom(case["seed"])
        out = random_crop_arr(images[case["image"]], case["image_size"],
                              min_crop_frac=case["min_crop_frac"],
                              max_crop_frac=case["max_crop_frac"], rng=rng)
        what = f"{case['image']} @ {case['image_size']} seed {case['seed']}"
        assert rng.calls == case["draws"], what
        np.testing.assert_array_equal(out, case["out"].numpy(), err_msg=what)


def test_random_crop_arr_without_rng_uses_the_random_module_like_the_reference():
    images = _fixture_images()
    case = load_fixture("preprocess.pt")["random_crop"][0]
    random.seed(case["seed"])
    out = random_crop_arr(images[case["image"]], case["image_size"],
                          case["min_crop_frac"], case["max_crop_frac"])
    np.testing.assert_array_equal(out, case["out"].numpy())


def test_superres_low_res_matches_reference():
    f = load_fixture("preprocess.pt")
    for case in f["superres_lowres"]:
        got = superres_low_res(case["large"], case["small_size"])
        assert_within(got, case["low_res"], atol=1e-6, what=f"low_res {case['small_size']}")
        # numpy in, numpy out (the Ray Data pipeline works on numpy batches)
        got_np = superres_low_res(case["large"].numpy(), case["small_size"])
        assert isinstance(got_np, np.ndarray)
        assert_within(torch.from_numpy(got_np), case["low_res"], atol=1e-6)
    with pytest.raises(ValueError, match="NCHW"):
        superres_low_res(torch.zeros(3, 8, 8), 4)


def test_sample_file_to_upsampler_input_matches_reference():
    case = load_fixture("preprocess.pt")["superres_sample_loading"]
    got = hwc_to_chw(to_model_range(case["arr_0"].numpy()))
    assert_within(torch.from_numpy(np.ascontiguousarray(got)), case["low_res"], atol=1e-6)


def test_crop_arguments_are_checked():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        center_crop_arr(img, 0)
    with pytest.raises(ValueError, match="min_crop_frac"):
        random_crop_arr(img, 8, min_crop_frac=0.9, max_crop_frac=0.5)


# ---------------------------------------------------------------- decoding ImageNet's oddities


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_cmyk_jpeg_becomes_rgb():
    data = _encode(Image.fromarray(_noise(20, 30, 4), "CMYK"), "JPEG")
    assert read_info(data).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == (30, 20)
    # The reference opens and convert("RGB")s: same pixels.
    ref = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ref))


def test_grayscale_and_rgba_become_rgb():
    gray = _noise(16, 12, 1)[..., 0]
    img = decode_image(_encode(Image.fromarray(gray, "L"), "JPEG", quality=100))
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    rgba = _noise(9, 7, 4)
    img = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    # Alpha is dropped (not composited), as the reference's convert("RGB") does.
    np.testing.assert_array_equal(np.asarray(img), rgba[..., :3])
    pal = Image.fromarray(_noise(8, 8, 3)).convert("P")
    assert decode_image(_encode(pal, "PNG")).mode == "RGB"


def test_16bit_grayscale_is_scaled_not_saturated():
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    img = decode_image(_encode(Image.fromarray(a), "PNG"))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.round(a / 257.0).astype(np.uint8))


def test_png_named_jpeg_is_read_by_content():
    rgb = _noise(10, 10, 3)
    data = _encode(Image.fromarray(rgb), "PNG")  # would be stored as e.g. n02105855_2933.JPEG
    assert read_info(data).format == "PNG"
    np.testing.assert_array_equal(np.asarray(decode_image(data)), rgb)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
        (_encode(Image.fromarray(_noise(64, 64, 3)), "JPEG")[:600], "truncated"),
        (_encode(Image.fromarray(_noise(64, 64, 3)), "PNG")[:300], "truncated"),
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_bad_files_raise_a_clear_error(data, reason):
    with pytest.raises(BadImageError, match=reason) as info:
        check_image(data)
    assert reason in info.value.reason
