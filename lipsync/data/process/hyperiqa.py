"""hyperIQA (Su et al., CVPR 2020): blind image quality, 0-100, higher is better.

A ResNet-50 backbone feeds (a) "local distortion aware" vectors pooled from its four stages, the
input of a small *target* MLP, and (b) its last feature map, from which a *hyper* network
predicts that MLP's weights and biases per image. Layer names follow the authors' release so
their ``koniq_pretrained.pkl`` state dict loads unchanged (strictly):
``HyperNet(lda_out_channels=16, hyper_in_channels=112, target_in_size=224, fc1..fc4 = 112, 56,
28, 14, feature_size=7)``, input 224 x 224 RGB normalised with the ImageNet mean and std.
Written here from the paper's description; no weights ship with lipsync.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lipsync.errors import CheckpointError

__all__ = ["HyperIQA", "load_hyperiqa"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, cin, H, W) -> (B, 4 * width, H / stride, W / stride)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(y + skip)


def _stage(cin: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(cin, width, stride)]
    layers += [Bottleneck(width * 4, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """ResNet-50 with the four local-distortion-aware (LDA) heads."""

    def __init__(self, lda_out: int, target_in: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 3, 1)
        self.layer2 = _stage(256, 128, 4, 2)
        self.layer3 = _stage(512, 256, 6, 2)
        self.layer4 = _stage(1024, 512, 3, 2)
        self.lda1_pool = nn.Sequential(nn.Conv2d(256, 16, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda1_fc = nn.Linear(16 * 64, lda_out)
        self.lda2_pool = nn.Sequential(nn.Conv2d(512, 32, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda2_fc = nn.Linear(32 * 16, lda_out)
        self.lda3_pool = nn.Sequential(nn.Conv2d(1024, 64, 1, bias=False), nn.AvgPool2d(7, 7))
        self.lda3_fc = nn.Linear(64 * 4, lda_out)
        self.lda4_pool = nn.AvgPool2d(7, 7)
        self.lda4_fc = nn.Linear(2048, target_in - 3 * lda_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 3, 224, 224) -> features (B, 2048, 7, 7), target input vector (B, target_in)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        x = self.layer1(x)
        v1 = self.lda1_fc(self.lda1_pool(x).flatten(1))
        x = self.layer2(x)
        v2 = self.lda2_fc(self.lda2_pool(x).flatten(1))
        x = self.layer3(x)
        v3 = self.lda3_fc(self.lda3_pool(x).flatten(1))
        x = self.layer4(x)
        v4 = self.lda4_fc(self.lda4_pool(x).flatten(1))
        return x, torch.cat([v1, v2, v3, v4], dim=1)


class HyperIQA(nn.Module):
    """Quality score per image (the hyper network and its target MLP in one forward)."""

    def __init__(
        self,
        lda_out: int = 16,
        hyper_in: int = 112,
        target_in: int = 224,
        sizes: tuple[int, int, int, int] = (112, 56, 28, 14),
        feature_size: int = 7,
    ):
        super().__init__()
        self.hyper_in, self.target_in, self.sizes = hyper_in, target_in, sizes
        self.feature_size = feature_size
        self.res = Backbone(lda_out, target_in)
        self.conv1 = nn.Sequential(
            nn.Conv2d(2048, 1024, 1), nn.ReLU(),
            nn.Conv2d(1024, 512, 1), nn.ReLU(),
            nn.Conv2d(512, hyper_in, 1), nn.ReLU(),
        )  # fmt: skip
        fan_in = (target_in, *sizes[:3])
        area = feature_size**2
        for i, (cin, cout) in enumerate(zip(fan_in, sizes, strict=True), start=1):
            setattr(self, f"fc{i}w_conv", nn.Conv2d(hyper_in, cin * cout // area, 3, padding=1))
            setattr(self, f"fc{i}b_fc", nn.Linear(hyper_in, cout))
        self.fc5w_fc = nn.Linear(hyper_in, sizes[3])
        self.fc5b_fc = nn.Linear(hyper_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 224, 224) ImageNet-normalised RGB -> (B,) quality scores
        feat, vec = self.res(x)
        h = self.conv1(feat)  # (B, hyper_in, 7, 7)
        pooled = h.mean(dim=(2, 3))  # (B, hyper_in)
        q = vec  # (B, target_in)
        fan_in = (self.target_in, *self.sizes[:3])
        for i, (cin, cout) in enumerate(zip(fan_in, self.sizes, strict=True), start=1):
            w = getattr(self, f"fc{i}w_conv")(h).reshape(-1, cout, cin)  # per-image weights
            b = getattr(self, f"fc{i}b_fc")(pooled)  # (B, cout)
            q = torch.sigmoid(torch.einsum("boi,bi->bo", w, q) + b)
        w5 = self.fc5w_fc(pooled)  # (B, sizes[3])
        return (w5 * q).sum(dim=1) + self.fc5b_fc(pooled)[:, 0]


def load_hyperiqa(path: str | os.PathLike, device: str | torch.device = "cpu") -> HyperIQA:
    """The authors' ``koniq_pretrained.pkl`` (a state dict, possibly under ``"model"``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read hyperIQA weights {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model = HyperIQA()
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a hyperIQA (koniq) state dict: {first}") from None
    return model.to(device).eval().requires_grad_(False)
