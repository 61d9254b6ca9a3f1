"""The quickstart data set: scikit-learn's 8x8 handwritten digits as real labelled images.

1,797 grayscale digits in 10 classes ship inside the scikit-learn wheel, so the quickstart needs
no download. They are written through the same shard writer as ImageNet, as PNG files:

* **32x32** (``DIGITS_IMAGE_SIZE``): upscaled from 8x8 with the reference's BICUBIC filter.
  32 is the smallest size at which the ADM U-Net keeps its shape (three downsamplings, attention
  at 16 and 8 pixels, as in the CIFAR-scale configs) while training stays fast on a CPU; bicubic
  gives smooth strokes rather than 4x4 blocks. Larger sizes can be asked for.
* **grayscale PNG** (mode ``L``): the 17 intensity levels (0..16) are scaled to 0..255; the data
  pipeline turns them into RGB like any grayscale ImageNet file.
* **a held-out split** ``val``: in each class, every tenth image in scikit-learn's order
  (ranks 9, 19, ...), 176 images (~10 %), so the split is deterministic and stratified; the
  other 1,621 are ``train``.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from adm import storage
from adm.data.shards import Log, ShardWriterConfig, stderr_log, write_split
from adm.data.sources import InputError, ScanResult, SourceItem
from adm.storage import S3Options

DIGITS_IMAGE_SIZE = 32
DIGITS_CLASSES = [str(d) for d in range(10)]
VAL_EVERY = 10  # every tenth image of each class is held out


def check_image_size(image_size: int) -> None:
    """``InputError`` unless ``image_size`` is a size the digits can be written at (>= 8)."""
    if image_size < 8:
        raise InputError(f"image size must be at least 8 (the digits are 8x8), got {image_size}")


def digits_png(image_8x8: np.ndarray, image_size: int = DIGITS_IMAGE_SIZE) -> bytes:
    """One digit (float [8, 8] with values 0..16) as grayscale PNG bytes of
    ``image_size x image_size``."""
    pixels = np.clip(np.round(image_8x8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "L")
    if image_size != img.width:
        img = img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def digits_scans(image_size: int = DIGITS_IMAGE_SIZE) -> dict[str, ScanResult]:
    """The digits as in-memory candidate images, split into ``train`` and ``val``."""
    from sklearn.datasets import load_digits

    check_image_size(image_size)
    digits = load_digits()
    splits: dict[str, list[SourceItem]] = {"train": [], "val": []}
    rank_in_class: dict[int, int] = {}
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        target = int(target)
        rank = rank_in_class.get(target, 0)
        rank_in_class[target] = rank + 1
        split = "val" if rank % VAL_EVERY == VAL_EVERY - 1 else "train"
        name = f"{target}/digit-{index:04d}.png"
        splits[split].append(SourceItem(name, str(target), data=digits_png(image, image_size)))
    return {k: ScanResult(sorted(v, key=lambda it: it.source), []) for k, v in splits.items()}


def prepare_digits(
    out: str,
    *,
    image_size: int = DIGITS_IMAGE_SIZE,
    config: ShardWriterConfig = ShardWriterConfig(images_per_shard=256),
    s3: S3Options | None = None,
    log: Log = stderr_log,
) -> dict[str, dict[str, Any]]:
    """Write ``out/train`` and ``out/val`` shards of the digits; return the manifests."""
    manifests = {}
    for split, scan in digits_scans(image_size).items():
        manifests[split] = write_split(scan, DIGITS_CLASSES, storage.join(out, split),
                                       split=split, config=config, s3=s3, log=log)
    return manifests
