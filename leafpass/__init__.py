"""leafpass: ZeRO-3 leaf modules that ``torch.compile`` keeps opaque.

    import torch, leafpass
    leafpass.set_z3_leaf_modules(model, [MoEBlock])
    compiled = torch.compile(model, backend="z3leaf")

Importing leafpass wraps ``nn.Module.__call__`` once (see ``leafpass.capture``) and
registers the ``torch.ops.leafpass.prefetch_all`` op. The backend is also found by
name through the ``torch_dynamo_backends`` entry point, without importing leafpass.
Importing leafpass also makes accelerate (transformers' ``Trainer``) accept leafpass's
backend names, once accelerate is imported (``leafpass.integrations.accelerate``).
"""

from __future__ import annotations

from . import capture as _capture
from . import ops as _ops  # noqa: F401  (registers torch.ops.leafpass.prefetch_all)
from .backend import make_backend, z3leaf_backend
from .flags import (
    DEFAULT_LEAF_MODULE_CLASSES,
    apply_leaf_module_config,
    get_z3_leaf_modules,
    set_z3_leaf_module,
    set_z3_leaf_modules,
    set_z3_leaf_modules_by_name,
    set_z3_leaf_modules_by_suffix,
    unset_z3_leaf_modules,
    z3_leaf_module,
    z3_leaf_parameter,
)
from .format import format_graph
from .gather_ops import live_gathered
from .gather import gather_stats
from .graph_nodes import is_leaf_call_node, is_prefetch_node
from .leaf_compile import leaf_compile_stats
from .integrations import accelerate as _accelerate_integration
from .options import GATHER_POLICIES, INNER_COMPILERS, OPTIONS
from .integrations.backend_names import register_backend, register_from_environment as _register_from_environment
from .record import GraphRecorder, record_graphs
from .runtime import NullRuntime, PrefetchRuntime, use_runtime
from .schedule_check import LeafScheduleMismatch, leaf_schedule
from .shape_inference import LeafShapeError
from .leaf_arguments import LeafArgumentError

_capture.install()
_register_from_environment()  # LEAFPASS_BACKENDS, if set
_accelerate_integration.install_when_imported()  # accelerate accepts the names above (imports nothing)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LEAF_MODULE_CLASSES",
    "GATHER_POLICIES",
    "GraphRecorder",
    "INNER_COMPILERS",
    "LeafArgumentError",
    "LeafScheduleMismatch",
    "LeafShapeError",
    "NullRuntime",
    "OPTIONS",
    "PrefetchRuntime",
    "apply_leaf_module_config",
    "format_graph",
    "gather_stats",
    "leaf_compile_stats",
    "get_z3_leaf_modules",
    "is_leaf_call_node",
    "is_prefetch_node",
    "leaf_schedule",
    "live_gathered",
    "make_backend",
    "record_graphs",
    "register_backend",
    "set_z3_leaf_module",
    "set_z3_leaf_modules",
    "set_z3_leaf_modules_by_name",
    "set_z3_leaf_modules_by_suffix",
    "unset_z3_leaf_modules",
    "use_runtime",
    "z3_leaf_module",
    "z3_leaf_parameter",
    "z3leaf_backend",
]
