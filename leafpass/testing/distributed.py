"""Run a function on N processes joined by a gloo process group, on CPU, with a hard timeout.

::

    from leafpass.testing.distributed import run_ranks

    def body(rank, world_size, steps):       # top level: it is pickled into each process
        ...
        return something_picklable

    values = run_ranks(body, 3, world_size=2, timeout=60)   # values[rank]

With ``process_group="nccl"`` (a CUDA machine, one GPU per rank) each rank joins an NCCL
group instead, on ``cuda:RANK`` (``torch.cuda.set_device``), with ``DS_ACCELERATOR=cuda``;
everything else below holds for both.

Each rank is a fresh ``spawn`` process with ``DS_ACCELERATOR=cpu``, one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, ``TORCHINDUCTOR_COMPILE_THREADS=1``)
and ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set, with a free
port per run. Before ``body`` runs, the rank joins a gloo process group
(``init_process_group(timeout=pg_timeout)``, so a collective whose peer is gone fails
instead of blocking forever) and, with ``deepspeed=True``, DeepSpeed's communication layer
is attached to that group without JIT-building DeepSpeed's CPU shared-memory op (see
:func:`leafpass.testing.deepspeed_cpu.attach_deepspeed_comm`). Training code must also not
name ``Adam``/``AdamW`` as the config optimizer (that JIT-builds a CPU FusedAdam): pass a
``torch.optim`` optimizer to ``deepspeed.initialize`` instead; :func:`zero3_config` never
names one.

Failure handling: a rank whose ``body`` raises sends its traceback to the parent and leaves
at once with ``os._exit(1)``; its sockets close, so the peers blocked in a collective get a
gloo error (at the latest after ``pg_timeout``), report it and exit 1 as well. The parent
raises :class:`DistributedRunError` naming the rank that failed first with an error of its
own (not a lost connection or a timeout) with its traceback, then what the others said. A
rank still running at ``timeout`` has its Python stacks dumped to stderr and is killed; the
error names it as hung.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

__all__ = [
    "DistributedRunError",
    "RankReport",
    "free_port",
    "run_ranks",
    "zero3_config",
]


@dataclasses.dataclass
class RankReport:
    rank: int
    ok: bool = False
    value: Any = None
    error: str | None = None  # traceback text of a rank that raised
    reported_at: float | None = None  # time.time() when the rank reported
    exitcode: int | None = None
    hung: bool = False


class DistributedRunError(AssertionError):
    """Some rank raised, exited without reporting, or hung. ``reports[rank]`` says which."""

    def __init__(self, message: str, reports: list[RankReport]) -> None:
        super().__init__(message)
        self.reports = reports

    @property
    def first_failed_rank(self) -> int | None:
        """The rank whose failure caused the others' (see :func:`_root_cause_order`)."""
        failed = _root_cause_order(self.reports)
        return failed[0].rank if failed else None

    @property
    def hung_ranks(self) -> list[int]:
        return [r.rank for r in self.reports if r.hung]

    @property
    def exitcodes(self) -> list[int | None]:
        return [r.exitcode for r in self.reports]


# Errors a rank gets because a peer died: the connection drops or the collective times out.
_PEER_LOSS = re.compile(
    r"Connection (reset|closed) by peer|Broken pipe|Socket Timeout|Timed out waiting|"
    r"timed out|Connection refused|remote worker hanging",
    re.IGNORECASE,
)


def _root_cause_order(reports: list[RankReport]) -> list[RankReport]:
    """Failed ranks, the likely root cause first.

    A rank that raised its own error comes before one whose last error line says it lost a
    peer (gloo's "Connection reset by peer" once the failing rank has exited, or a
    timeout); within each group, the earliest failure comes first.
    """
    failed = [r for r in reports if r.error is not None]

    def key(r: RankReport):
        lines = r.error.strip().splitlines()
        lost_peer = bool(lines) and bool(_PEER_LOSS.search(lines[-1]))
        return (lost_peer, r.reported_at if r.reported_at is not None else float("inf"))

    return sorted(failed, key=key)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero3_config(
    micro_batch_size: int = 1,
    *,
    max_live_parameters: int | None = None,
    max_reuse_distance: int | None = None,
    prefetch_bucket_size: int | None = None,
    param_persistence_threshold: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO-3 in fp32 that matches plain torch step for step.

    ``gradient_clipping`` is 0 (DeepSpeed's default clips at 1.0), untested (torch)
    optimizers are allowed, and no config optimizer is named. ``param_persistence_threshold``
    defaults to 0 so that even tiny parameters are partitioned (DeepSpeed keeps parameters
    under 1e5 elements whole by default). The ``stage3_*`` limits keep DeepSpeed's defaults
    unless given; 0 for all three makes ZeRO-3 gather each module at its entry and release
    it after use, so every gather is visible. ``overrides`` update the top level, and a
    ``zero_optimization`` dict in them updates that section.
    """
    zero: dict[str, Any] = {
        "stage": 3,
        "stage3_param_persistence_threshold": param_persistence_threshold,
    }
    for key, value in (
        ("stage3_max_live_parameters", max_live_parameters),
        ("stage3_max_reuse_distance", max_reuse_distance),
        ("stage3_prefetch_bucket_size", prefetch_bucket_size),
    ):
        if value is not None:
            zero[key] = value
    zero.update(overrides.pop("zero_optimization", {}))
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    config.update(overrides)
    return config


# --------------------------------------------------------------------------- child side


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    conn: multiprocessing.connection.Connection,
    args: tuple,
    kwargs: dict,
    pg_timeout: float,
    attach_deepspeed: bool,
    process_group: str = "gloo",
) -> None:
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    # torch 2.13 deprecates the collective names DeepSpeed 0.19 calls; one line per call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is (deprecated|a private function)")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if process_group == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            process_group, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
        )
        if attach_deepspeed:
            from leafpass.testing.deepspeed_cpu import attach_deepspeed_comm

            attach_deepspeed_comm()
        value = fn(rank, world_size, *args, **kwargs)
        payload = pickle.dumps((True, value, time.time()))
    except BaseException:
        failed_at = time.time()  # before any slow formatting: peers fail only after we exit
        text = traceback.format_exc()
        sys.stderr.write(f"[rank {rank}] failed:\n{text}")
        sys.stderr.flush()
        with contextlib.suppress(BaseException):
            conn.send_bytes(pickle.dumps((False, text, failed_at)))
            conn.close()
        # Leave now: no process-group teardown (it may wait for peers). Closing our
        # sockets is what makes the peers' pending collectives fail fast.
        os._exit(1)
    conn.send_bytes(payload)
    conn.close()
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -------------------------------------------------------------------------- parent side


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
    pg_timeout: float = 30.0,
    deepspeed: bool = True,
    env: dict[str, str] | None = None,
    process_group: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes; return the values.

    ``process_group`` is ``"gloo"`` (CPU) or ``"nccl"`` (one CUDA GPU per rank).

    ``fn`` and its arguments must be picklable (``fn`` defined at module top level), and so
    must its return value. Raises :class:`DistributedRunError` if any rank raises, dies
    without reporting, exits non-zero or is still running after ``timeout`` seconds.
    """
    if process_group not in ("gloo", "nccl"):
        raise ValueError(f"run_ranks: process_group must be 'gloo' or 'nccl', got {process_group!r}")
    if process_group == "nccl":
        import torch

        if torch.cuda.device_count() < world_size:
            raise RuntimeError(
                f"run_ranks(process_group='nccl') runs one rank per GPU: world_size={world_size} but "
                f"torch sees {torch.cuda.device_count()} CUDA device(s); lower world_size or use 'gloo'"
            )
    ctx = multiprocessing.get_context("spawn")
    child_env = {
        "DS_ACCELERATOR": "cuda" if process_group == "nccl" else "cpu",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        # Inductor compiles in-process instead of starting a worker pool per rank.
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        **(env or {}),
    }
    reports = [RankReport(rank) for rank in range(world_size)]
    procs, conns = [], {}
    with _environ(child_env):
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, writer, args, kwargs, pg_timeout, deepspeed, process_group),
                name=f"rank{rank}",
                daemon=False,  # a rank may start processes of its own (compile workers)
            )
            p.start()
            writer.close()
            procs.append(p)
            conns[reader] = rank
    deadline = time.monotonic() + timeout
    try:
        _collect(procs, conns, reports, deadline)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        for conn in conns:
            conn.close()
    for report, p in zip(reports, procs):
        report.exitcode = p.exitcode
    _raise_on_failure(reports, timeout)
    return [r.value for r in reports]


def _collect(procs, conns, reports: list[RankReport], deadline: float) -> None:
    open_conns = dict(conns)
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if not open_conns and not alive:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        waitables = list(open_conns) + [p.sentinel for p in alive]
        for ready in multiprocessing.connection.wait(waitables, timeout=remaining):
            rank = open_conns.get(ready)
            if rank is None:
                continue  # a process ended; its pipe tells us (EOF) what it left
            try:
                ok, value, at = pickle.loads(ready.recv_bytes())
            except EOFError:
                del open_conns[ready]
                continue
            except Exception:
                ok, value, at = False, "its result could not be received:\n" + traceback.format_exc(), time.time()
            report = reports[rank]
            report.ok, report.reported_at = ok, at
            if ok:
                report.value = value
            else:
                report.error = value
            del open_conns[ready]
    # Deadline: whoever is still running hangs. Dump its stacks, then kill it.
    hung = [i for i, p in enumerate(procs) if p.exitcode is None]
    for i in hung:
        reports[i].hung = True
        if hasattr(signal, "SIGUSR1"):
            with contextlib.suppress(Exception):
                os.kill(procs[i].pid, signal.SIGUSR1)
    if hung:
        time.sleep(1.0)


def _raise_on_failure(reports: list[RankReport], timeout: float) -> None:
    failed = _root_cause_order(reports)
    hung = [r for r in reports if r.hung]
    silent = [r for r in reports if not r.ok and r.error is None and not r.hung]
    bad_exit = [r for r in reports if r.ok and r.exitcode not in (0, None)]
    if not (failed or hung or silent or bad_exit):
        return
    parts = []
    if failed:
        first = failed[0]
        parts.append(f"rank {first.rank} raised:\n{first.error}")
        for r in failed[1:]:
            last = r.error.strip().splitlines()[-1] if r.error.strip() else "(no message)"
            parts.append(f"rank {r.rank} failed too ({r.reported_at - first.reported_at:+.2f}s after rank "
                         f"{first.rank}): {last}")
    if hung:
        parts.insert(
            0,
            f"rank(s) {[r.rank for r in hung]} still running after {timeout:.0f}s: killed "
            "(their Python stacks were dumped to stderr)",
        )
    for r in silent:
        parts.append(f"rank {r.rank} exited with code {r.exitcode} without reporting a result")
    for r in bad_exit:
        parts.append(f"rank {r.rank} returned but exited with code {r.exitcode}")
    raise DistributedRunError("\n".join(parts), reports)
