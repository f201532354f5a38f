"""Small hand-built models for the backend's tests (the shared MoE models live in
``leafpass.testing.models``)."""

from __future__ import annotations

import torch
from torch import nn

from leafpass.testing.models import MoEBlock


class Nested(nn.Module):
    """An outer leaf whose child is flagged too: the outermost flagged module wins."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.outer = nn.Sequential(nn.Linear(d, d), MoEBlock(d), nn.ReLU())
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return self.out(self.outer(self.inp(x)))


class Twice(nn.Module):
    """One leaf entered twice."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.moe = MoEBlock(d)
        self.mid = nn.Linear(d, d)

    def forward(self, x):
        return self.moe(self.mid(self.moe(x)))


class KwargsLeaf(nn.Module):
    """A leaf with keyword arguments and a ``(tensor, dict)`` output."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.moe = MoEBlock(d)
        self.gate = nn.Linear(d, 1)

    def forward(self, x, *, scale: float = 1.0, mask=None):
        y = self.moe(x) * scale
        if mask is not None:
            y = y * mask
        return y, {"gate": torch.sigmoid(self.gate(y)), "aux": y.pow(2).mean()}


class KwargsModel(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.block = KwargsLeaf(d)

    def forward(self, x, mask):
        y, extra = self.block(self.inp(x), scale=0.5, mask=mask)
        return y * extra["gate"] + extra["aux"]


class TiedInside(nn.Module):
    """A leaf holding one Parameter under two names."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight

    def forward(self, x):
        h = torch.relu(self.a(x))
        if (h > 0).sum() == 0:  # data-dependent branch
            return h
        return self.b(h)


class TiedModel(nn.Module):
    """Shared parameters: inside a leaf, and between a leaf and a non-leaf module."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.leaf = TiedInside(d)
        self.head = nn.Linear(d, d)
        self.head.weight = self.leaf.a.weight  # shared across the leaf boundary

    def forward(self, x):
        return self.head(self.leaf(self.inp(x)))
