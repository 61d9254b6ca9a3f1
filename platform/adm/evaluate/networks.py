"""Feature networks: what `--features inception:PATH|classifier:URI` names, checked in the
driver (``resolve_network``), and built on a worker (``FeatureExtractor``).

* ``inception:PATH``: the FID Inception-v3 (``adm.evaluate.inception``): ``pool`` [N, 2048],
  ``spatial`` [N, 2023] (sFID), ``logits`` [N, 1008]. Its input handling (``inputs``) is the
  TensorFlow evaluator's (``"tf1"``, the default) or pytorch-fid's (``"pytorch-fid"``); it is
  part of the cache key, since the features differ.
* ``classifier:URI``: one of our noisy classifiers, at t = 0 (clean images). ``pool`` is its
  penultimate feature -- the input of its last layer: the pooled channels (``adaptive``), the
  attention pool's query token before its output projection (``attention``), the MLP's hidden
  layer (``spatial``, ``spatial_v2``) -- and ``logits`` its output. It has no spatial feature,
  so no sFID. The file (``.pt`` or ``.safetensors``) and its flags are found and checked as
  the sampling job does (``adm.checkpoints``: ``flags.json`` beside the file, else a
  safetensors file's metadata).

Without ``--features``, the Inception weights are looked for at ``$ADM_INCEPTION_WEIGHTS``,
else ``./pt_inception-2015-12-05-6726825d.pth``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoints, storage
from ..config import ConfigError
from . import inception

KINDS = ("inception", "classifier")
WEIGHTS_ENV = "ADM_INCEPTION_WEIGHTS"


@dataclass(frozen=True)
class FeatureNetwork:
    """A checked feature network: ``kind``, the weights' ``uri`` and ``sha256``, and for a
    classifier its ``spec`` (flags) from ``adm.checkpoints.resolve``."""

    kind: str
    uri: str
    sha256: str
    spec: checkpoints.ModelSpec | None = None
    inputs: inception.InputMode = "tf1"  # the Inception's input handling

    @property
    def key(self) -> str:
        """The cache key: the network kind (with the Inception's input handling) and the first
        16 hex digits of its file's hash."""
        if self.kind == "inception":
            return f"{self.kind}-{self.inputs}-{self.sha256[:16]}"
        return f"{self.kind}-{self.sha256[:16]}"

    @property
    def has_spatial(self) -> bool:
        return self.kind == "inception"

    def describe(self) -> dict:
        out = {"kind": self.kind, "uri": self.uri, "sha256": self.sha256}
        if self.kind == "inception":
            out["inputs"] = self.inputs
        if self.spec is not None:
            out["flags"] = self.spec.flags
        return out


def default_features() -> str:
    return "inception:" + os.environ.get(WEIGHTS_ENV, inception.WEIGHTS_FILE)


def parse_features(text: str | None) -> tuple[str, str]:
    """'inception:PATH' or 'classifier:URI' -> (kind, uri); a ConfigError otherwise."""
    text = text or default_features()
    kind, sep, uri = text.partition(":")
    if kind == "inception" and not sep:
        return parse_features(default_features())
    if kind not in KINDS or not uri:
        raise ConfigError(f"--features {text!r}: expected inception:PATH (the FID Inception "
                          f"weights, {inception.WEIGHTS_FILE}) or classifier:URI (a classifier "
                          "state dict, .pt or .safetensors, with flags.json beside it)")
    return kind, uri


def resolve_network(text: str | None, inception_inputs: str = "tf1") -> FeatureNetwork:
    """Read and check the network's file (keys and shapes), before any image is touched.
    ``inception_inputs``: the Inception's input handling (``inception.INPUTS``)."""
    if inception_inputs not in inception.INPUTS:
        raise ConfigError(f"inception_inputs: {inception_inputs!r} is not one of "
                          f"{', '.join(inception.INPUTS)}")
    kind, uri = parse_features(text)
    if kind == "classifier":
        spec = checkpoints.resolve("classifier", uri, None, "classifier")
        return FeatureNetwork(kind, uri, spec.sha256, spec)
    if not storage.is_file(uri):
        raise inception.InceptionWeightsError(inception.missing_weights_message(uri))
    raw = storage.read_bytes(uri)
    inception.read_weights(raw, uri)
    return FeatureNetwork(kind, uri, inception.weights_sha256(raw), inputs=inception_inputs)


def penultimate_layer(classifier: nn.Module) -> nn.Module:
    """The classifier's last layer (its input is the penultimate feature)."""
    head = classifier.out
    if classifier.pool == "attention":
        return head[-1].c_proj
    if classifier.pool == "adaptive":
        return head[-2]  # the 1x1 conv before Flatten
    return head[-1]


class ClassifierFeatures(nn.Module):
    """A classifier at t = 0 as a feature network: uint8 NHWC images in, ``pool`` (its
    penultimate feature [N, F]) and ``logits`` [N, classes] out. Images of another size than
    the classifier's are resized to it (bilinear, antialiased)."""

    def __init__(self, classifier: nn.Module, image_size: int):
        super().__init__()
        self.classifier, self.image_size = classifier, image_size
        self._seen: list[torch.Tensor] = []
        penultimate_layer(classifier).register_forward_pre_hook(
            lambda module, args: self._seen.append(args[0]))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # the training data's [-1, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        self._seen.clear()
        logits = self.classifier(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
        feats = self._seen.pop()
        if feats.ndim == 3:  # attention pool: [N, C, 1 + HW], the query (mean) token
            feats = feats[:, :, 0]
        return {"pool": feats.reshape(len(x), -1).float(), "logits": logits.float()}


def build_network(net: FeatureNetwork, device: torch.device) -> nn.Module:
    """The feature network on ``device``, eval mode, with its weights (on a worker)."""
    if net.kind == "inception":
        raw = storage.read_bytes(net.uri)
        return inception.load_inception(inception.read_weights(raw, net.uri), device,
                                        net.inputs)
    classifier = checkpoints.load(net.spec, device)
    return ClassifierFeatures(classifier, checkpoints.image_size(net.spec)).to(device)


class FeatureExtractor:
    """Features of uint8 NHWC images, ``batch_size`` images per network call.

    ``__call__(images [N, H, W, 3] uint8)`` -> ``pool`` [N, D], ``logits`` [N, C] and, for
    Inception, ``spatial`` [N, 2023]; float32 numpy."""

    def __init__(self, net: FeatureNetwork, batch_size: int = 64, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = build_network(net, self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.array(images[s:s + self.batch_size]))  # a writable copy
            for name, value in self.net(x.to(self.device)).items():
                parts.setdefault(name, []).append(value.cpu().numpy())
        return {name: np.concatenate(v) for name, v in parts.items()}
