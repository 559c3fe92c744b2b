"""Classifier networks for latents (C, h, w) and pixels (3, H, W), written here (no torchvision).

Every network is built as `Net(in_channels, image_size, num_classes, **options)`: configs name the class
and its options, and the classification module supplies the first three from the data.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearProbe(nn.Module):
    """A single linear layer on the flattened input: how linearly separable the classes already are."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(in_channels * image_size * image_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1))


class MLP(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden: tuple[int, ...] = (512,),
        dropout: float = 0.1,
    ) -> None:
        """
        Args:
            hidden: Widths of the hidden layers.
            dropout: Dropout after each hidden layer.
        """
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels * image_size * image_size
        for size in hidden:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        self.body = nn.Sequential(*layers, nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


class ConvNet(nn.Module):
    def __init__(
        self, in_channels: int, image_size: int, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)
    ) -> None:
        """A small CNN: per width, conv-BN-ReLU twice then 2x downsampling; global average pool; linear.

        Args:
            widths: Channels of each stage (stages stop halving once the map is 2x2).
        """
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in widths:
            layers += [_conv_bn(channels, width), _conv_bn(width, width)]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, stride)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
    ) -> None:
        """ResNet-18's layout (four stages of two basic blocks, widths w, 2w, 4w, 8w) with a 3x3 stem
        and no stem pooling, as used for small images (CIFAR-style).

        Args:
            blocks: Basic blocks per stage ((2, 2, 2, 2) is ResNet-18).
            width: Channels of the first stage.
        """
        super().__init__()
        self.stem = _conv_bn(in_channels, width)
        stages: list[nn.Module] = []
        channels = width
        for index, num_blocks in enumerate(blocks):
            out_channels = width * 2**index
            for block in range(num_blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(_BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block whose attention weights can be read back."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.norm1(x)
        attended, weights = self.attention(h, h, h, need_weights=need_weights, average_attn_weights=False)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights  # weights: (B, heads, T, T) or None


class PatchTransformer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int = 2,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        """A transformer over non-overlapping patches with a CLS token: the attention classifier on latents,
        and a small ViT on pixels. `cls_attention` gives the CLS token's attention over the patches.

        Args:
            patch_size: Side of a square patch (latent cells or pixels).
            dim: Token width.
            depth: Transformer blocks.
            heads: Attention heads.
            mlp_ratio: MLP hidden width as a multiple of dim.
            dropout: Dropout in attention and MLP.
        """
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"model.net.patch_size: {patch_size} does not divide the input size {image_size}")
        self.grid = image_size // patch_size
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, 1 + self.grid**2, dim) * 0.02)
        self.blocks = nn.ModuleList(_AttentionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, dim)
        cls = self.cls_token.expand(len(x), -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position  # (B, 1 + grid*grid, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._tokens(x)
        for block in self.blocks:
            tokens, _ = block(tokens)
        return self.head(self.norm(tokens[:, 0]))

    @torch.no_grad()
    def cls_attention(self, x: torch.Tensor, rollout: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> (B, grid, grid): how much the CLS token attends to each patch, averaged over heads.

        With `rollout` (Abnar & Zuidema, 2020) the attention of every layer is chained, with the residual
        path counted as attention to oneself; otherwise only the last layer's attention is used.
        """
        tokens = self._tokens(x)
        num_tokens = tokens.shape[1]
        chained = torch.eye(num_tokens).expand(len(x), -1, -1)
        for block in self.blocks:
            tokens, weights = block(tokens, need_weights=True)
            layer = weights.mean(dim=1)  # (B, T, T)
            if rollout:
                layer = 0.5 * layer + 0.5 * torch.eye(num_tokens)
                layer = layer / layer.sum(dim=-1, keepdim=True)
                chained = layer @ chained
            else:
                chained = layer
        cls_to_patches = chained[:, 0, 1:]  # (B, grid*grid)
        cls_to_patches = cls_to_patches / cls_to_patches.sum(dim=1, keepdim=True)
        return cls_to_patches.view(len(x), self.grid, self.grid)
