"""The three ADM networks: the U-Net denoiser, the super-resolution U-Net and the noisy-image
classifier. Plain PyTorch; nothing here knows about Ray."""
from .classifier import POOLS, Classifier
from .layers import timestep_embedding
from .unet import SuperResUNet, UNet

__all__ = ["UNet", "SuperResUNet", "Classifier", "POOLS", "timestep_embedding"]
