"""Second stage of the dish detector: classify each localised box.

Why a separate classifier: with perfect boxes, frozen ImageNet features reach
only 88% crop accuracy across capture sessions, and Plate vs Starter (the
main confusion) is partly a matter of size, so the classifier sees a square
context crop (shape and surroundings kept, not squashed) plus the box's size
and aspect relative to the frame, and its trunk is fine-tuned on dishes.
An extra ``background`` class rejects localiser false positives. The pooled
trunk features double as the appearance embedding the tracker uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .backbone import FEATURE_DIM, Lite0Trunk

BACKGROUND = "__background__"
CONTEXT = 0.15  # crop margin on each side, in box sizes


def box_geometry(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(N,4) xyxy boxes, (N,2) frame (w,h) -> (N,3): sqrt relative area, relative w/h balance, log aspect."""
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    rw, rh = w / sizes[:, 0], h / sizes[:, 1]
    return torch.stack([(rw * rh).sqrt() * 4.0, (rw - rh) * 4.0, torch.log(w / h)], dim=1)


def square_windows(boxes: torch.Tensor, context: float = CONTEXT) -> torch.Tensor:
    """Square windows centred on the boxes: the long side plus ``context`` on each side."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + 2 * context)
    return torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], dim=1)


def crop(images: torch.Tensor, boxes: list[torch.Tensor], size: int, context: float = CONTEXT) -> torch.Tensor:
    """Bilinear square context crops. images (B,3,H,W) float; boxes: per image (Ni,4) xyxy in its pixels.
    Outside the image is zero (black), as a camera's border would be."""
    wins = [square_windows(b, context) for b in boxes]
    # 2x2 bilinear samples per output pixel: some averaging when a large box is shrunk to ``size``
    return torchvision.ops.roi_align(images, wins, output_size=size, spatial_scale=1.0, sampling_ratio=2,
                                     aligned=True)


def rotate_crops(crops: torch.Tensor, max_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random top-down poses: any multiple of 90 degrees, a flip, and a small extra angle."""
    n = crops.shape[0]
    k = torch.randint(0, 4, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_deg) + k.float() * (math.pi / 2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    sx = torch.where(flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos
    grid = F.affine_grid(theta.to(crops), list(crops.shape), align_corners=False)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class DishClassifier(nn.Module):
    """Lite0 trunk on a square context crop + box geometry -> class logits (last = background)."""

    def __init__(self, num_classes: int, crop_size: int = 128, pretrained: bool = True, freeze_blocks: int = 0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.trunk = Lite0Trunk(pretrained, freeze_blocks)
        self.geo = nn.Sequential(nn.Linear(3, 32), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(FEATURE_DIM + 32, num_classes + 1)

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        return self.trunk(crops).mean(dim=(2, 3))

    def head(self, emb: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """Pooled trunk embedding (N, 1280) + box geometry (N, 3) -> logits (N, C+1)."""
        return self.fc(self.drop(torch.cat([emb, self.geo(geometry)], dim=1)))

    def forward(self, crops: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns logits (N, C+1) and the pooled trunk embedding (N, 1280)."""
        emb = self.features(crops)
        return self.head(emb, geometry), emb
