"""A tiny target for ``python -m leafpass explain``.

    python -m leafpass explain examples/explain_target.py            # build(): MoE blocks flagged
    python -m leafpass explain examples/explain_target.py:build_unflagged --suggest

A target function returns ``(model, example_inputs)``: the inputs are a tuple of
positional arguments or a dict of keyword arguments.
"""

import torch

import leafpass
from leafpass.testing.models import MoEBlock, TwoMoE


def build_unflagged():
    """TwoMoE with nothing flagged: its MoE routing breaks the graph."""
    torch.manual_seed(0)
    model = TwoMoE(d=16)
    return model, (torch.randn(6, 16),)


def build():
    """TwoMoE with both MoE blocks flagged as ZeRO-3 leaves: one graph, two prefetches."""
    model, inputs = build_unflagged()
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    return model, inputs
