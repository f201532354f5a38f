"""Setting DeepSpeed up on CPU ranks without its JIT builds (tests, benchmarks, examples).

``deepspeed.init_distributed()`` on CPU JIT-builds a shared-memory comm op the first time
(75-112 s on 2 cores) that training never needs. :func:`skip_cpu_shm_comm_build` marks it
unavailable; :func:`attach_deepspeed_comm` joins ``deepspeed.comm`` to a process group the
process already initialised.
"""

from __future__ import annotations

from leafpass.runtime import engine_version

__all__ = ["attach_deepspeed_comm", "skip_cpu_shm_comm_build"]

_SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory comm op (75-112 s on 2 cores).

    Relies on deepspeed/comm/torch.py (0.19.x): ``TorchBackend.__init__`` calls
    ``build_shm_op()``, which loads (JIT-building on first use) the ``ShareMemCommBuilder``
    op only when ``deepspeed.ops.__compatible_ops__`` marks it compatible; that dict is
    probed once and cached in deepspeed/ops/__init__.py, so marking the op incompatible
    before the backend is built makes DeepSpeed fall back to plain torch.distributed
    collectives (the op only speeds up inference all-reduce; training never needs it).
    """
    engine_version("deepspeed")  # imports DeepSpeed, refuses an unsupported one
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    name = getattr(builder, "NAME", _SHM_COMM_OP) if builder is not None else _SHM_COMM_OP
    deepspeed.ops.__compatible_ops__[name] = False


def attach_deepspeed_comm() -> None:
    """Attach ``deepspeed.comm`` to the ``torch.distributed`` group this process already joined.

    Call after ``torch.distributed.init_process_group``; ``deepspeed.initialize`` then finds
    its communication backend ready and builds nothing. The CPU shared-memory op is skipped
    (:func:`skip_cpu_shm_comm_build`). Relies on deepspeed/comm/comm.py (0.19.x):
    ``init_distributed`` wraps an initialised torch.distributed in a ``TorchBackend``.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("attach_deepspeed_comm() needs torch.distributed.init_process_group() first")
    skip_cpu_shm_comm_build()
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    ds_comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
