"""DINO's multi-crop augmentation as its reference code writes it (``DataAugmentationDINO`` in
facebookresearch/dino ``main_dino.py``): PIL images, torchvision v1 transforms, float tensors
normalised on the CPU. Restated here as the baseline of the pipeline benchmark."""

from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from midol.data.transforms import IMAGENET_MEAN, IMAGENET_STD


class _GaussianBlur:
    """Blur with radius ~ U(0.1, 2.0), applied with probability ``p`` (DINO ``utils.py``)."""

    def __init__(self, p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(random.uniform(self.radius_min, self.radius_max)))


class _Solarization:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class DINOTorchvisionTransform:
    """``num_global`` global crops (blur 1.0; blur 0.1 + solarize 0.2) and ``num_local`` local
    crops (blur 0.5); bicubic random-resized crops; flip, colour jitter 0.8, grayscale 0.2."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                p=0.8,
            ),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        self.global1 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
            flip_and_color_jitter, _GaussianBlur(1.0), normalize,
        ])
        self.global2 = transforms.Compose([
            transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
            flip_and_color_jitter, _GaussianBlur(0.1), _Solarization(0.2), normalize,
        ])
        self.local = transforms.Compose([
            transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic),
            flip_and_color_jitter, _GaussianBlur(0.5), normalize,
        ])
        self.num_local = num_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.num_local)]
        return crops


def pil_loader(path: str) -> Image.Image:
    """torchvision ``ImageFolder``'s default loader (what DINO and lightly's examples use)."""
    with open(path, "rb") as fh:
        return Image.open(fh).convert("RGB")
