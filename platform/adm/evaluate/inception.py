"""The FID Inception-v3: the 2015-12-05 TensorFlow graph's weights as pytorch-fid ported them.

The layer layout and parameter names are pytorch-fid's (torchvision's ``Inception3`` with 1008
classes and no auxiliary head, and its FID patches: TensorFlow's average pools leave padding out
of the average, and the last block max-pools), so its released file
``pt_inception-2015-12-05-6726825d.pth`` loads with ``strict=True``.

Its input handling is the TensorFlow graph's by default (``INPUTS``, ``preprocess``): the ADM
evaluator feeds 0..255 images at their own size, the graph resizes them to 299x299 with TF1's
legacy ``ResizeBilinear`` (``tf1_resize_bilinear``) and maps them with ``(x - 128) / 128``.
``"pytorch-fid"`` is pytorch-fid's handling instead: ``F.interpolate`` (half-pixel centres) of
x / 255, then ``2x - 1``; its FIDs are not comparable with the paper's.

Three features, as the ADM evaluator reads them from the TensorFlow graph:

* ``pool`` [N, 2048]: ``pool_3``, the final average pool (FID, precision and recall);
* ``spatial`` [N, 7 * 17 * 17 = 2023]: ``mixed_6/conv``, the first 7 channels, flattened in
  TensorFlow's height, width, channel order (sFID; the order matters only when comparing with
  statistics computed by the evaluator, such as the reference batches' ``mu_s``/``sigma_s``).
  The graph's ``mixed_6`` is torchvision's ``Mixed_6d`` (``mixed``..``mixed_2`` are 5b..5d,
  ``mixed_3``..``mixed_7`` are 6a..6e), and its ``conv`` is that block's 1x1 branch: here the
  output of ``Mixed_6d.branch1x1`` (convolution, batch norm, ReLU), 192 channels at 17x17;
* ``logits`` [N, 1008]: ``pool @ fc.weight.T`` -- the evaluator's softmax takes only the
  ``softmax/logits/MatMul`` weight, without the bias (Inception Score).

The weights come only from a file the user gives: nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import io
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoints import CheckpointError, read_state_dict, state_dict_mismatch
from ..config import UserError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SOURCE = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  + WEIGHTS_FILE)
NUM_CLASSES = 1008  # the TensorFlow graph's softmax has 1008 outputs (1000 used)
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]
InputMode = Literal["tf1", "pytorch-fid"]
INPUTS: tuple[str, ...] = get_args(InputMode)


class InceptionWeightsError(UserError, FileNotFoundError):
    """The FID Inception weights are missing or are not pytorch-fid's file."""


def _legacy_source(in_size: int, out_size: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output position: the lower and upper source index and the weight of the
    upper one, computed as TensorFlow's LegacyScaler does, all in float32 (a float64 scale
    moves outputs by up to 8e-3 on 0..255 values)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size,
                                                                       dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    floor = src.floor()
    lower = floor.long().clamp(0, in_size - 1)
    upper = src.ceil().long().clamp(0, in_size - 1)
    return lower.to(device), upper.to(device), (src - floor).to(device)


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``ResizeBilinear`` (``tf.compat.v1.image.
    resize_bilinear`` with ``align_corners=False``, ``half_pixel_centers=False``): the op in
    the 2015 Inception graph that resizes the ADM evaluator's images to 299x299.

    Output pixel (i, j) reads the source at (i * in_h / out_h, j * in_w / out_w), without
    half-pixel centres, the scale and coordinates in float32, and the source's last row and
    column repeated past its edge; rows are interpolated first, then columns, in float32, in
    TensorFlow's order of operations. No antialiasing (a downscale skips pixels, as TF's).
    Matches TensorFlow's output to within 1e-4 on 0..255 values (tests/fixtures/tf1_resize).

    :param x: float [N, C, H, W]. :param size: (out_h, out_w).
    :return: float32 [N, C, out_h, out_w]."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"tf1_resize_bilinear takes float NCHW images, got {x.dtype} "
                         f"{tuple(x.shape)}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"tf1_resize_bilinear: output size must be positive, got {size}")
    x = x.float()
    left, right, wx = _legacy_source(x.shape[-1], out_w, x.device)
    top, bottom, wy = _legacy_source(x.shape[-2], out_h, x.device)
    a, b = x[..., top, :], x[..., bottom, :]
    tl, tr, bl, br = a[..., left], a[..., right], b[..., left], b[..., right]
    upper = tl + (tr - tl) * wx
    lower = bl + (br - bl) * wx
    return upper + (lower - upper) * wy[:, None]


def preprocess(images: torch.Tensor, inputs: InputMode = "tf1") -> torch.Tensor:
    """uint8 (or float 0..255) NHWC images of any size -> float32 NCHW [N, 3, 299, 299] in
    [-1, 1]. ``"tf1"``: the evaluator's graph (TF1 legacy resize of the 0..255 values, then
    (x - 128) / 128); ``"pytorch-fid"``: ``F.interpolate`` of x / 255, then 2x - 1."""
    x = images.permute(0, 3, 1, 2).float()
    if inputs == "tf1":
        return (tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE)) - 128) / 128
    if inputs == "pytorch-fid":
        x = F.interpolate(x / 255.0, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False)
        return 2 * x - 1
    raise ValueError(_unknown_inputs(inputs))


def _unknown_inputs(inputs: str) -> str:
    return f"Inception inputs {inputs!r}: expected one of {', '.join(INPUTS)}"


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """pytorch-fid's FIDInceptionA (Mixed_5b..5d)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """pytorch-fid's FIDInceptionC (Mixed_6b..6e), factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pytorch-fid's FIDInceptionE_1 (Mixed_7b, average pool) and FIDInceptionE_2 (Mixed_7c,
    max pool: the TensorFlow graph's, where the paper has an average)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _avg_pool(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pytorch-fid's parameter names); ``forward`` returns the features
    the ADM evaluator uses."""

    def __init__(self, inputs: InputMode = "tf1"):
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(_unknown_inputs(inputs))
        self.inputs = inputs
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images -> float32 [N, 3, 299, 299]: ``preprocess`` with this network's
        ``inputs``."""
        return preprocess(images, self.inputs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """:param images: uint8 [N, H, W, 3] (any H, W).
        :return: ``pool`` [N, 2048], ``spatial`` [N, 2023] (mixed_6/conv[..., :7], HWC order),
        ``logits`` [N, 1008] (pool @ fc.weight.T, no bias), all float32."""
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        # TensorFlow's mixed_6/conv: Mixed_6d's 1x1 branch (it is computed again inside the
        # block below; 1/1000 of the network's work, for plain modules and exact names).
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        spatial = spatial.permute(0, 2, 3, 1).reshape(len(x), -1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool.float(), "spatial": spatial.float(),
                "logits": (pool @ self.fc.weight.T).float()}


def missing_weights_message(path: str) -> str:
    return (f"no FID Inception weights at {path}: evaluation needs pytorch-fid's port of the "
            f"2015-12-05 TensorFlow Inception, {WEIGHTS_FILE} (download it once from "
            f"{WEIGHTS_SOURCE} -- pytorch-fid's GitHub release 'fid_weights' -- and give its "
            f"path: --features inception:/path/to/{WEIGHTS_FILE}); nothing is downloaded here")


def read_weights(raw: bytes, path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``raw``, read as every checkpoint is (``weights_only=True``, by
    ``adm.checkpoints.read_state_dict``); an error naming ``path`` when it is not a state dict
    of the FID Inception's keys and shapes."""
    try:
        state = read_state_dict(io.BytesIO(raw), path)
    except CheckpointError as e:
        raise InceptionWeightsError(f"{e}; expected {WEIGHTS_FILE}") from None
    with torch.device("meta"):
        problems = state_dict_mismatch(FIDInceptionV3(), state,
                                       skip=lambda key: key.endswith("num_batches_tracked"))
    if problems:
        raise InceptionWeightsError(
            f"{path} is not the FID Inception's state dict ({WEIGHTS_FILE}): {problems}")
    return state


def weights_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def load_inception(state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                   inputs: InputMode = "tf1") -> FIDInceptionV3:
    """The network with ``state`` loaded strictly, in eval mode, without gradients, taking
    its input as ``inputs`` says (``preprocess``)."""
    with torch.device("meta"):  # no random initialisation of 24M parameters to overwrite
        net = FIDInceptionV3(inputs)
    net.load_state_dict(state, strict=True, assign=True)
    return net.eval().requires_grad_(False).to(device)
