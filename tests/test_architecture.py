"""The layout rule of docs/architecture.md, checked on the code's own imports.

Every module of leafpass belongs to one layer; a module imports only from its own layer
or the layers below it, never from a layer above (lazy imports inside functions count);
no two modules import each other, even through others; the tools import only the public
API. The layer order is written once, here (docs/architecture.md draws the same).
"""

from __future__ import annotations

import ast
import pathlib
import unittest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "leafpass"

# bottom first; a module is matched by the longest name listed that is it or a package
# holding it ("leafpass" itself is only the package's __init__)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", (
        "leafpass.versions", "leafpass.dynamo_internals", "leafpass.options", "leafpass.leaf_call",
        "leafpass.graph_nodes", "leafpass.module_plan", "leafpass.record", "leafpass.wrapped",
        "leafpass.leaf_arguments",
    )),
    ("runtime interface", (
        "leafpass.runtime", "leafpass.runtime.null", "leafpass.runtime.leaf_inputs", "leafpass.names", "leafpass.ops",
        "leafpass.gather_ops", "leafpass.gather",
    )),
    ("flags", ("leafpass.flags",)),
    ("capture", ("leafpass.capture", "leafpass.shape_inference")),
    ("passes", ("leafpass.passes",)),
    ("lowering", ("leafpass.lower", "leafpass.leaf_compile", "leafpass.schedule_check", "leafpass.format")),
    ("engines", (
        "leafpass.runtime.deepspeed_shards", "leafpass.runtime.deepspeed", "leafpass.runtime.deepspeed_runtime",
        "leafpass.runtime.deepspeed_module", "leafpass.runtime.deepspeed_grad_path",
        "leafpass.runtime.deepspeed_step_gather",
        "leafpass.runtime.deepspeed_gatherer",
    )),
    ("backend", ("leafpass.backend",)),
    ("public API", ("leafpass", "leafpass.integrations", "leafpass.testing")),
    # the tools' parts, each one idea, below the entry points that put them together
    # (explain_report.build_report, zero3_compare.compare, demo, explain, __main__)
    ("tool parts", (
        "leafpass.tools.explain_frames", "leafpass.tools.explain_reasons", "leafpass.tools.explain_modules",
        "leafpass.tools.explain_run", "leafpass.tools.explain_graphs", "leafpass.tools.explain_events",
        "leafpass.tools.explain_causes", "leafpass.tools.explain_suggest", "leafpass.tools.explain_check",
        "leafpass.tools.zero3_ways", "leafpass.tools.zero3_probes", "leafpass.tools.zero3_rank",
        "leafpass.tools.zero3_rows", "leafpass.tools.zero3_table", "leafpass.tools.deepspeed_probe",
        "leafpass.tools.summary",
    )),
    ("tools", ("leafpass.tools", "leafpass.__main__")),
]
TOOL_LAYERS = ("tool parts", "tools")

# Imports that are entry points, not dependencies: after_import.py is also run by path from
# leafpass-startup.pth at interpreter start, and its hook's one job is `import leafpass`.
ENTRY_POINT_IMPORTS = {("leafpass.integrations.after_import", "leafpass")}

# what a tool may import from leafpass: the public API (and other tools)
PUBLIC = ("leafpass", "leafpass.testing", "leafpass.runtime", "leafpass.tools")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: pathlib.Path) -> set[str]:
    """The leafpass modules ``path`` imports, at the top or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "leafpass")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "leafpass":
                continue
            for alias in node.names:  # `from . import capture` imports the module leafpass.capture
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}
    for module, entry in ENTRY_POINT_IMPORTS:
        graph[module].discard(entry)
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "leafpass"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_architecture.py "
                             f"and to docs/architecture.md")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


class ArchitectureTest(unittest.TestCase):
    def test_every_module_has_a_layer(self):
        for module in import_graph():
            layer_of(module)

    def test_no_import_cycles(self):
        self.assertEqual(cycles(import_graph()), [])

    def test_imports_only_go_down(self):
        upward = []
        for module, deps in import_graph().items():
            for dep in deps:
                if layer_of(dep) > layer_of(module):
                    upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})")
        self.assertEqual(sorted(upward), [])

    def test_tools_import_only_the_public_api(self):
        private = []
        for module, deps in import_graph().items():
            if LAYERS[layer_of(module)][0] not in TOOL_LAYERS:
                continue
            for dep in deps:
                if not any(dep == p or dep.startswith(p + ".") for p in PUBLIC) or (
                    dep.startswith("leafpass.runtime.")
                ):
                    private.append(f"{module} -> {dep}")
        self.assertEqual(sorted(private), [])

    def test_the_checker_sees_what_it_must(self):
        # a cycle and an upward arrow, made up, are found (the checks above can fail)
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])
        self.assertGreater(layer_of("leafpass.lower"), layer_of("leafpass.passes.insert_gathers"))
        self.assertGreater(layer_of("leafpass.runtime.deepspeed_gatherer"), layer_of("leafpass.runtime"))
        self.assertGreater(layer_of("leafpass.tools.explain_report"), layer_of("leafpass.tools.explain_run"))
        self.assertGreater(layer_of("leafpass.tools.explain_run"), layer_of("leafpass"))
        self.assertIn("leafpass.lower", imports_of(PACKAGE / "backend.py"))
        with self.assertRaisesRegex(AssertionError, "belongs to no layer"):
            layer_of("leafpass.not_placed")


if __name__ == "__main__":
    unittest.main()

