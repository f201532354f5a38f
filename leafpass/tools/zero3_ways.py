"""The ways :mod:`.zero3_compare` trains the same model (:data:`WAYS`, :data:`WAY_SETUPS`,
:data:`WAY_OPTIONS`), the ZeRO-3 limit presets, and what one comparison trains
(:class:`CompareSpec`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from leafpass import INNER_COMPILERS as INNER_CHOICES  # one list: the backend's

__all__ = [
    "INNER_CHOICES", "LOSS_TOLERANCE", "MODULE_GOAL_VS_EAGER_STRICT", "WAYS", "WAY_OPTIONS", "WAY_SETUPS",
    "ZERO_PRESETS", "CompareSpec", "DeepSpeedMissing", "check_deepspeed", "z3leaf_options",
]

WAYS = ("eager", "eager_strict", "inductor", "inductor_strict", "z3leaf", "z3leaf_step", "z3leaf_strict",
        "z3leaf_module", "z3leaf_hooks")
# way -> (backend, ZeRO-3 limits preset or None for the spec's, z3leaf's gather option)
WAY_SETUPS: dict[str, tuple[str | None, str | None, str | None]] = {
    "eager": (None, None, None),
    "eager_strict": (None, "strict", None),
    "inductor": ("inductor", None, None),
    "inductor_strict": ("inductor", "strict", None),
    "z3leaf": ("z3leaf", None, "auto"),
    "z3leaf_step": ("z3leaf", None, "step"),
    "z3leaf_strict": ("z3leaf", "strict", "auto"),
    "z3leaf_module": ("z3leaf", "strict", "module"),
    "z3leaf_hooks": ("z3leaf", None, "hooks"),
}
# way -> more z3leaf options (besides inner and gather); ways not named pass none, so
# gather="module" takes its bucket size and prefetch distance from the engine's config.
# z3leaf_module: buckets of up to 600,000 elements hold every stretch between two leaves
# of the benchmark's MoEStack (d=256: at most ~330,000 elements) in one all-gather; no
# prefetch, so no bucket or leaf is in flight while another is gathered, and at most one
# bucket (its receive buffer and its weights while they are cut apart) or one leaf (~2.1e6
# elements) is whole at a time: no more than eager ZeRO-3 under strict limits holds. A
# prefetch distance of 1 would gather the next leaf while the last bucket is alive: faster
# on a network that overlaps, but above eager's peak (GatheredElementsTracker counts
# gathers in flight).
WAY_OPTIONS: dict[str, dict[str, Any]] = {
    "z3leaf_module": {"bucket_elements": 600_000, "prefetch_distance": 0},
}
# the goal of gather="module": a step at most this fraction of eager ZeRO-3's under strict
# limits, at no higher peak gathered elements
MODULE_GOAL_VS_EAGER_STRICT = 0.8
LOSS_TOLERANCE = 1e-5  # max |loss - eager loss| over every step of every rank

# ZeRO-3 limits (zero3_config keyword arguments). "strict": gather each module when it is
# entered and release it right after use, as ZeRO-3 does when the model does not fit, so
# every gather shows up in the all-gather count. "default": DeepSpeed's own limits, which
# keep a model this small gathered from one step to the next (few all-gathers per step).
ZERO_PRESETS: dict[str, dict[str, Any]] = {
    "strict": {"max_live_parameters": 0, "max_reuse_distance": 0, "prefetch_bucket_size": 0},
    "default": {},
}


class DeepSpeedMissing(RuntimeError):
    """DeepSpeed is not installed (or not importable)."""


def check_deepspeed() -> str:
    """DeepSpeed's version; raise :class:`DeepSpeedMissing` with an install hint if it is missing."""
    try:
        from leafpass.runtime import engine_version

        return engine_version("deepspeed")
    except ImportError as exc:
        raise DeepSpeedMissing(
            f"DeepSpeed is not installed ({exc}); install it with: pip install 'leafpass[deepspeed]'"
        ) from exc


@dataclasses.dataclass
class CompareSpec:
    """What to train and how. ``zero`` updates :func:`zero3_config`'s keyword arguments."""

    d: int = 64
    n_layers: int = 2
    n_experts: int = 8
    top_k: int = 2
    hidden: int | None = None
    tokens: int = 32  # per rank and step
    steps: int = 8  # warm-up steps, then steady (timed) steps
    # Untimed steps: the first compiles; the second recompiles what new routing changed
    # (dynamic shapes, guards on DeepSpeed's counters). None: 2, or 1 when steps < 3.
    warmup: int | None = None
    ranks: int = 2
    inner: str = "inductor"  # z3leaf's compiler for the non-leaf pieces
    seed: int = 0
    lr: float = 0.1
    zero_limits: str = "default"  # a ZERO_PRESETS name (ways named *_strict use "strict")
    zero: dict[str, Any] = dataclasses.field(default_factory=dict)  # more zero3_config kwargs
    hook_timing: bool = False
    quiet: bool = True  # silence DeepSpeed's info logs and Dynamo's recompile-limit warnings
    # "fresh": each way compiles into its own empty Inductor cache (cold compiles, and a
    # later way cannot reuse kernels an earlier one compiled); "shared": the usual
    # on-disk cache, so reruns are faster but compile seconds depend on what ran before.
    inductor_cache: str = "fresh"
    progress: bool = False  # a tqdm bar on rank 0 (stderr)
    timeout: float = 900.0  # seconds per way (all ranks)

    def __post_init__(self) -> None:
        if self.warmup is None:
            self.warmup = max(1, min(2, self.steps - 1))
        problems = []
        for name in ("d", "n_layers", "n_experts", "top_k", "tokens", "ranks"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.warmup < 1:
            problems.append("warmup must be >= 1 (the first step compiles)")
        elif self.steps <= self.warmup:
            problems.append(f"steps must be > warmup ({self.warmup}): the steps after the warm-up are timed")
        if self.top_k > self.n_experts:
            problems.append(f"top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.inductor_cache not in ("fresh", "shared"):
            problems.append("inductor_cache must be 'fresh' or 'shared'")
        if self.zero_limits not in ZERO_PRESETS:
            problems.append(f"zero_limits must be one of {list(ZERO_PRESETS)}")
        if self.inner not in INNER_CHOICES:
            problems.append(f"inner must be one of {list(INNER_CHOICES)}")
        if problems:
            raise ValueError("; ".join(problems))

    def zero_kwargs(self, limits: str | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`~leafpass.testing.distributed.zero3_config`, with the
        ``limits`` preset (a way's own) instead of ``zero_limits`` if given."""
        return {**ZERO_PRESETS[limits or self.zero_limits], **self.zero}

    def model_config(self) -> dict[str, Any]:
        return {
            "class": "MoEStack",
            "d": self.d,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "hidden": self.hidden or 2 * self.d,
            "leaf_classes": ["MoEBlock"],
        }


def z3leaf_options(way: str, spec: CompareSpec) -> dict[str, Any] | None:
    """The ``options`` a z3leaf way compiles with: ``inner``, ``gather`` and the way's
    :data:`WAY_OPTIONS`; None for the other ways."""
    backend, _, gather = WAY_SETUPS[way]
    if backend != "z3leaf":
        return None
    return {"inner": spec.inner, "gather": gather, **WAY_OPTIONS.get(way, {})}
