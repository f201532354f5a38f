"""Small models whose blocks are ZeRO-3 leaf candidates.

* :class:`MoEBlock`: a mixture-of-experts block with data-dependent routing. It picks the
  top-k experts of each token, finds each expert's tokens with ``nonzero`` and skips experts
  that got no tokens. Under ZeRO-3 such a block must be a leaf module: ranks that route
  differently would otherwise issue different parameter gathers and deadlock or mix data.
* :class:`TwoMoE`: ``Linear -> MoEBlock -> Linear -> MoEBlock``.
* :class:`ManyTinyBlock` / :class:`ManyTinyModel`: a leaf holding a couple of hundred tiny
  submodules, where gathering per submodule would cost one collective each.
* :func:`divergent_routing_batches`: one batch per rank, chosen so that some expert gets no
  token on one rank and some tokens on another.

Everything is defined at module level so processes started with ``spawn`` can unpickle it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ExpertMLP",
    "ManyTinyBlock",
    "ManyTinyModel",
    "MoEBlock",
    "MoELayer",
    "MoEStack",
    "TinyAffine",
    "TwoMoE",
    "divergent_routing_batches",
    "moe_blocks",
    "routing_counts",
]


class ExpertMLP(nn.Module):
    """One expert: ``Linear(d, hidden) -> GELU -> Linear(hidden, d)``."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoEBlock(nn.Module):
    """Top-k mixture of experts that only runs the experts its tokens were routed to.

    ``last_expert_tokens`` holds, after each forward, how many (token, slot) pairs went to
    each expert; 0 means the expert was skipped and its parameters got no gradient here.
    """

    def __init__(self, d: int, n_experts: int = 4, top_k: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoEBlock needs 1 <= top_k <= n_experts; got top_k={top_k}, n_experts={n_experts}")
        self.top_k = top_k
        self.router = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(d, hidden or 2 * d) for _ in range(n_experts))
        self.last_expert_tokens: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = self.router(tokens).softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        counts = []
        for index, expert in enumerate(self.experts):
            tok, slot = (chosen == index).nonzero(as_tuple=True)
            counts.append(int(tok.numel()))
            if tok.numel() == 0:
                continue
            routed = expert(tokens[tok]) * weights[tok, slot].unsqueeze(-1)
            out = out.index_add(0, tok, routed)
        self.last_expert_tokens = counts
        return out.reshape(shape)


class TwoMoE(nn.Module):
    """``Linear -> MoEBlock -> Linear -> MoEBlock``; flag the two blocks as leaves."""

    def __init__(self, d: int = 16, n_experts: int = 4, top_k: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.moe1 = MoEBlock(d, n_experts, top_k, hidden)
        self.mid = nn.Linear(d, d)
        self.moe2 = MoEBlock(d, n_experts, top_k, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe2(self.mid(self.moe1(self.inp(x))))


class MoELayer(nn.Module):
    """A pre-norm residual layer: ``x + MoEBlock(LayerNorm(x))`` then ``x + MLP(LayerNorm(x))``."""

    def __init__(self, d: int, n_experts: int, top_k: int, hidden: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.moe = MoEBlock(d, n_experts, top_k, hidden)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = ExpertMLP(d, hidden or 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.moe(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MoEStack(nn.Module):
    """``Linear -> n_layers x MoELayer -> LayerNorm -> Linear``: the demo's and benchmark's model.

    Flag :class:`MoEBlock` as the leaf class; everything else (norms, dense MLPs,
    projections) is ordinary, hooked module by module under ZeRO-3.
    """

    def __init__(self, d: int = 64, n_layers: int = 2, n_experts: int = 8, top_k: int = 2, hidden: int | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.layers = nn.ModuleList(MoELayer(d, n_experts, top_k, hidden) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(self.norm(x))


class TinyAffine(nn.Module):
    """``x * weight + bias`` with per-feature parameters: a deliberately tiny submodule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.01 * torch.randn(d))
        self.bias = nn.Parameter(0.01 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class ManyTinyBlock(nn.Module):
    """A leaf holding ``n_sub`` tiny submodules (``2 * n_sub`` parameters) applied in turn."""

    def __init__(self, d: int = 16, n_sub: int = 200) -> None:
        super().__init__()
        self.subs = nn.ModuleList(TinyAffine(d) for _ in range(n_sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for sub in self.subs:
            x = torch.tanh(sub(x))
        return x


class ManyTinyModel(nn.Module):
    """``Linear -> ManyTinyBlock -> Linear``; flag the block as a leaf."""

    def __init__(self, d: int = 16, n_sub: int = 200) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.block = ManyTinyBlock(d, n_sub)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x)))


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The model's :class:`MoEBlock` instances, in registration order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def routing_counts(model: nn.Module) -> list[list[int]]:
    """Tokens per expert of every :class:`MoEBlock` in ``model`` at its last forward."""
    return [list(block.last_expert_tokens) for block in moe_blocks(model)]


def divergent_routing_batches(
    model: nn.Module,
    world_size: int,
    n_tokens: int = 8,
    *,
    seed: int = 0,
    max_trials: int = 200,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[list[list[int]]]]:
    """One ``(input, target)`` batch per rank such that the ranks route differently.

    ``model`` must hold whole (not yet partitioned) parameters and at least one
    :class:`MoEBlock`; it is run once per rank and trial. Each rank's tokens are scattered
    around a direction of their own, so a rank uses a few experts and skips the others.
    The first trial where every rank has some expert that gets no token there while
    another rank sends it tokens wins. Every process that calls this with the same model
    and seed gets the same batches, so rank ``r`` simply takes ``batches[r]``.

    Returns ``(batches, counts)``, ``counts[rank][block][expert]`` being the routing seen.
    """
    if world_size < 2:
        raise ValueError("divergent_routing_batches needs world_size >= 2")
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoEBlock to route")
    d = blocks[0].router.in_features
    for trial in range(max_trials):
        gen = torch.Generator().manual_seed(seed * 100_003 + trial)
        batches, counts = [], []
        for _rank in range(world_size):
            center = 2.0 * torch.randn(d, generator=gen)
            x = center + 0.5 * torch.randn(n_tokens, d, generator=gen)
            target = torch.randn(n_tokens, d, generator=gen)
            with torch.no_grad():
                model(x)
            batches.append((x, target))
            counts.append(routing_counts(model))
        if _diverges(counts):
            return batches, counts
    raise RuntimeError(f"no routing split between {world_size} ranks found in {max_trials} trials (seed={seed})")


def _diverges(counts: list[list[list[int]]]) -> bool:
    """Every rank skips some expert that another rank sends tokens to."""
    world_size = len(counts)
    for rank in range(world_size):
        found = False
        for b, block_counts in enumerate(counts[rank]):
            for e, n in enumerate(block_counts):
                if n == 0 and any(counts[o][b][e] > 0 for o in range(world_size) if o != rank):
                    found = True
        if not found:
            return False
    return True
