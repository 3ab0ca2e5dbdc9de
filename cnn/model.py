"""The seed CNN: three conv blocks, a 625-unit hidden layer, ten logits.

Shapes (per image): 1x28x28 -> 32x14x14 -> 64x7x7 -> 128x4x4 (the last pool
pads by 1) -> 2048 -> 625 -> 10.  Unlike the tutorial it came from, the
forward pass does run the ReLU and dropout of the hidden layer.
"""

from __future__ import annotations

import torch
from torch import nn

# Forward multiply-accumulates per image, x2 for FLOPs: conv1 28*28*32*9,
# conv2 14*14*64*32*9, conv3 7*7*128*64*9, fc1 2048*625, fc2 625*10.
FORWARD_FLOPS_PER_IMAGE = 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 7 * 7 * 128 * 64 * 9 + 2048 * 625 + 625 * 10)
# Backward costs about twice the forward (gradients w.r.t. inputs and weights).
TRAIN_FLOPS_PER_IMAGE = 3 * FORWARD_FLOPS_PER_IMAGE


def _block(c_in: int, c_out: int, pool_padding: int = 0) -> nn.Sequential:
    # The seed's conv -> ReLU -> max-pool, computed as conv -> max-pool -> ReLU.
    # ReLU is monotonic and the pool pads with -inf, so max(relu(x)) == relu(max(x))
    # exactly and the gradients agree; pooling first lets the ReLU and its backward
    # touch a quarter of the elements (the 32x28x28 activation is the largest here).
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2, padding=pool_padding),
        nn.ReLU(inplace=True),
    )


class CNN(nn.Module):
    def __init__(self, dropout: float = 0.2, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, 32),
            _block(32, 64),
            _block(64, 128, pool_padding=1),  # 7x7 -> 4x4
        )
        self.hidden = nn.Sequential(
            nn.Linear(4 * 4 * 128, 625),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(625, num_classes)
        for layer in (self.hidden[0], self.head):  # the seed's init
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.hidden(torch.flatten(x, 1))
        return self.head(x)
