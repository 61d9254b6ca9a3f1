"""Image decoding and the reference's preprocessing, pixel for pixel.

``center_crop_arr`` and ``random_crop_arr`` reproduce guided-diffusion's ``image_datasets.py``
pixel for pixel (same Pillow resampling, same rounding, same order of random draws), and
``superres_low_res`` reproduces ``super_res_train.py``'s low-resolution input. ``decode_image``
turns the bytes stored in a shard into the RGB image those functions expect, whatever ImageNet
throws at it (CMYK JPEGs, grayscale, RGBA, palette images, PNGs named ``.JPEG``).
"""
from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

BOX = Image.Resampling.BOX
BICUBIC = Image.Resampling.BICUBIC


class BadImageError(ValueError):
    """The bytes are not an image Pillow can fully decode; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image: container format as Pillow detected it from the
    content (``"JPEG"``, ``"PNG"``, ...; not the file name), original mode (``"CMYK"``, ``"L"``,
    ``"RGBA"``, ...), and size in pixels."""

    format: str
    mode: str
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise BadImageError("empty file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadImageError("not an image Pillow can identify") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(f"too many pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parser failure means "bad file"
        if "truncat" in str(e).lower():
            raise BadImageError(f"truncated: {e}") from e
        raise BadImageError(f"unreadable header: {type(e).__name__}: {e}") from e


def read_info(data: bytes) -> ImageInfo:
    """Parse only the header (cheap: no pixel decoding). Raises ``BadImageError``."""
    img = _open(data)
    return ImageInfo(img.format or "unknown", img.mode, img.width, img.height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way the reference does (``convert("RGB")``): CMYK via
    Pillow's conversion, grayscale replicated, alpha dropped (not composited), palettes
    expanded. 16/32-bit grayscale is scaled to 8 bits instead of saturating, which the
    reference's plain convert would do (ImageNet has no such files; other sets may)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:  # floats in [0, 1]
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.round(arr)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    if img.mode == "RGB":
        return img
    with warnings.catch_warnings():
        # "Palette images with Transparency expressed in bytes should be converted to RGBA":
        # we drop alpha on purpose, as the reference does.
        warnings.simplefilter("ignore", UserWarning)
        return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an RGB Pillow image.

    The format is detected from the content, so a PNG saved as ``.JPEG`` decodes as a PNG.
    Raises ``BadImageError`` (with a short reason) for empty, truncated or undecodable data:
    ``load()`` reads the whole stream, so truncation is caught here rather than producing a
    half-grey image (Pillow's ``LOAD_TRUNCATED_IMAGES`` stays off)."""
    img = _open(data)
    try:
        img.load()
        if img.width <= 0 or img.height <= 0:
            raise BadImageError(f"empty image ({img.width}x{img.height})")
        return _to_rgb(img)
    except BadImageError:
        raise
    except OSError as e:
        msg = str(e)
        if "truncat" in msg.lower():
            raise BadImageError(f"truncated: {msg}") from e
        raise BadImageError(f"decode error: {msg}") from e
    except Exception as e:  # noqa: BLE001 - decoder bugs on malformed files are "bad file" too
        raise BadImageError(f"decode error: {type(e).__name__}: {e}") from e


def check_image(data: bytes) -> ImageInfo:
    """Decode ``data`` completely (as training will) and return its header info; raises
    ``BadImageError`` if training could not use it."""
    info = read_info(data)
    decode_image(data)
    return info


def _box_halve_then_bicubic(pil_image: Image.Image, short_side: int) -> Image.Image:
    # The reference halves with BOX while the short side stays >= 2x the target (its Pillow had
    # no ``reducing_gap``), then makes one BICUBIC resize of the short side to the target. The
    # rounding (``x // 2``; Python's ``round``, ties to even) must match for identical pixels.
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=BOX)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The reference's ``center_crop_arr``: resize the short side to ``image_size`` and take the
    centre square. Returns uint8 ``[image_size, image_size, C]`` (C = 3 for RGB input)."""
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    arr = np.array(_box_halve_then_bicubic(pil_image, image_size))
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: random.Random | None = None,
) -> np.ndarray:
    """The reference's ``random_crop_arr``: resize the short side to a random length in
    ``[ceil(S / max_crop_frac), ceil(S / min_crop_frac)]`` and take a random ``S x S`` crop.

    ``rng`` is a ``random.Random`` (default: the ``random`` module, as the reference uses);
    its ``randrange`` is called exactly as the reference calls it: short side
    ``randrange(lo, hi + 1)``, then ``randrange(H - S + 1)``, then ``randrange(W - S + 1)``.
    Returns uint8 ``[S, S, C]``."""
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    if not 0 < min_crop_frac <= max_crop_frac <= 1:
        raise ValueError(
            f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}"
        )
    rng = random if rng is None else rng
    min_smaller_dim_size = math.ceil(image_size / max_crop_frac)
    max_smaller_dim_size = math.ceil(image_size / min_crop_frac)
    smaller_dim_size = rng.randrange(min_smaller_dim_size, max_smaller_dim_size + 1)
    arr = np.array(_box_halve_then_bicubic(pil_image, smaller_dim_size))
    crop_y = rng.randrange(arr.shape[0] - image_size + 1)
    crop_x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def to_model_range(arr: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] exactly as the reference scales them
    (``x / 127.5 - 1`` in float32); the layout is unchanged."""
    return arr.astype(np.float32) / 127.5 - 1


def hwc_to_chw(arr: np.ndarray) -> np.ndarray:
    """``[..., H, W, C]`` -> ``[..., C, H, W]`` (a view)."""
    return np.moveaxis(arr, -1, -3)


def superres_low_res(high_res, small_size: int):
    """The upsampler's low-resolution training input, as ``super_res_train.py`` makes it:
    ``F.interpolate(high_res, small_size, mode="area")``.

    ``high_res``: float NCHW batch in [-1, 1], ``[N, 3, L, L]`` (torch tensor or numpy array);
    returns ``[N, 3, small_size, small_size]`` of the same kind and dtype. Area interpolation
    averages each ``(L/s) x (L/s)`` block when ``s`` divides ``L``."""
    import torch
    import torch.nn.functional as F

    if small_size < 1:
        raise ValueError(f"small_size must be a positive integer, got {small_size}")
    is_numpy = isinstance(high_res, np.ndarray)
    x = torch.from_numpy(high_res) if is_numpy else high_res
    if x.ndim != 4:
        raise ValueError(f"high_res must be NCHW [N, C, L, L], got shape {tuple(x.shape)}")
    out = F.interpolate(x, small_size, mode="area")
    return out.numpy() if is_numpy else out
