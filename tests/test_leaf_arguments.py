"""Leaves called with arguments that are not tensors (``leafpass.leaf_arguments``).

One small leaf, ``Scaled``, reads its ``extra`` argument in every way a real leaf does:
``None``, an enum, Python scalars, a string, a frozen and a mutable dataclass, a
``ModelOutput``, nested containers, a plain object, a transformers ``DynamicCache``
it updates in place. Each case: one graph, no break under ``fullgraph=True``, one
``call_module`` of the leaf with one ``prefetch_all`` right before it, output and
gradients equal eager; objects the leaf mutates end in the same state as in eager.
"""

from __future__ import annotations

import copy
import dataclasses
import enum

import pytest
import torch
from torch import nn

import leafpass
from leafpass.leaf_arguments import LeafArgumentError
from tests.compile_case import CompileTestCase


class Mode(enum.Enum):
    DOUBLE = 2
    TRIPLE = 3


@dataclasses.dataclass
class Shift:
    scale: float
    bias: torch.Tensor


@dataclasses.dataclass(frozen=True)
class FrozenScale:
    scale: float


@dataclasses.dataclass
class Counter:
    """A mutable object the leaf updates: how many calls, and the last output."""

    calls: int = 0
    last: torch.Tensor | None = None


class Plain:
    def __init__(self, k: int, offset: torch.Tensor) -> None:
        self.k = k
        self.offset = offset


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, extra=None):
        y = self.lin(x)
        if extra is None:
            return y
        if isinstance(extra, Mode):
            return y * extra.value
        if isinstance(extra, torch.dtype):  # a constant torch 2.11 cannot take as a flat input
            return (y.to(extra) * 2).to(y.dtype)
        if isinstance(extra, bool):
            return y if extra else -y
        if isinstance(extra, (int, float)):
            return y * extra
        if isinstance(extra, str):
            return y * len(extra)
        if isinstance(extra, Shift):
            scale = extra.scale.scale if isinstance(extra.scale, FrozenScale) else extra.scale
            return y * scale + extra.bias
        if isinstance(extra, FrozenScale):
            return y * extra.scale
        if isinstance(extra, Counter):
            extra.calls += 1
            extra.last = y.detach()
            return y * extra.calls
        if isinstance(extra, Plain):
            return y * extra.k + extra.offset
        if type(extra).__name__ == "DynamicCache":
            keys, values = extra.update(y.view(1, 1, -1, 4), (2 * y).view(1, 1, -1, 4), 0)
            return y + keys.sum(-2).view(1, 4) + values.mean()
        if isinstance(extra, dict) and "last_hidden_state" in extra:  # a ModelOutput
            return y + extra["last_hidden_state"]
        return y * extra["a"][0] + extra["b"]["c"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.leaf = Scaled()
        self.leaf._z3_leaf = True

    def forward(self, x, extra):
        return self.leaf(self.inp(x), extra=extra).relu()


def leaf_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module"]


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


class TestArgumentKinds(CompileTestCase):
    def check(self, extra, make_extra=None):
        """Compiled == eager (output, gradients, the argument's state afterwards), one graph."""
        make_extra = make_extra or (lambda: copy.deepcopy(extra))
        torch.manual_seed(0)
        net = Net()
        ref = copy.deepcopy(net)
        x = torch.randn(3, 4)
        mine, theirs = make_extra(), make_extra()
        graphs, out = self.graphs_of(net, x, mine, inner="aot_eager")
        expected = ref(x, theirs)
        self.assertEqual(len(graphs), 1)
        self.assertEqual(graph_breaks(), 0)
        (call,) = leaf_calls(graphs[0])
        self.assertEqual(call.target, "leaf")
        self.assertEqual(call.prev.target, torch.ops.leafpass.prefetch_all.default)
        torch.testing.assert_close(out, expected)
        out.pow(2).sum().backward()
        expected.pow(2).sum().backward()
        for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"grad of {name}")
        return graphs[0], mine, theirs

    def test_none(self):
        self.check(None)

    def test_enum(self):
        self.check(Mode.TRIPLE)

    def test_scalars_and_string(self):
        for extra in (3, 0.5, False, "abcd"):
            with self.subTest(extra=extra):
                torch._dynamo.reset()
                self.check(extra)

    def test_frozen_dataclass(self):
        self.check(FrozenScale(1.5))

    def test_dtype(self):
        self.check(torch.float64)

    def test_frozen_dataclass_inside_an_object(self):
        # torch 2.11 passes frozen dataclasses by state: the one nested here is never written back
        extra = Shift(FrozenScale(2.0), torch.arange(4.0))
        _, mine, _ = self.check(extra)
        self.assertEqual(mine.scale, FrozenScale(2.0))

    def test_mutable_dataclass_with_a_tensor(self):
        self.check(Shift(2.0, torch.arange(4.0)))

    def test_plain_object(self):
        self.check(Plain(3, torch.ones(4)))

    def test_nested_containers(self):
        self.check({"a": (2, None, Mode.DOUBLE), "b": {"c": torch.ones(4)}})

    def test_object_the_leaf_mutates_ends_as_in_eager(self):
        _, mine, theirs = self.check(Counter(calls=4))
        self.assertEqual(mine.calls, 5)
        torch.testing.assert_close(mine.last, theirs.last)

    def test_model_output(self):
        transformers = pytest.importorskip("transformers")
        output = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=torch.ones(3, 4))
        gm, _, _ = self.check(output)
        (call,) = leaf_calls(gm)
        self.assertIn("build_BaseModelOutput", leafpass.format_graph(gm))  # rebuilt as itself, not a dict
        self.assertIsInstance(call.kwargs["extra"], torch.fx.Node)

    def test_dynamic_cache_updated_in_place(self):
        cache_utils = pytest.importorskip("transformers.cache_utils")
        # no layers yet: the leaf's update appends one, which is created after the graph
        gm, mine, theirs = self.check(None, make_extra=cache_utils.DynamicCache)
        self.assertEqual(len(mine.layers), 1)
        torch.testing.assert_close(mine.layers[0].keys, theirs.layers[0].keys)
        torch.testing.assert_close(mine.layers[0].values, theirs.layers[0].values)
        self.assertIs(type(mine.layers[0]), type(theirs.layers[0]))

    def test_snapshot_of_a_leaf_that_takes_a_cache(self):
        cache_utils = pytest.importorskip("transformers.cache_utils")
        gm, _, _ = self.check(None, make_extra=cache_utils.DynamicCache)
        self.assertExpectedInline(leafpass.format_graph(gm), """\
inputs: x
t0 = torch._C._nn.linear(x, inp.weight, inp.bias)
t1 = build_DynamicCache()
prefetch_all leaf (2 params)
t2 = leaf(t0, extra=t1)
t3 = read_DynamicCache(t1)
t4 = getitem(t3, 0)
t5 = getitem(t3, 1)
t6 = t2.relu()
return (t6, t5, t4)
""")


class TestGuardsAndErrors(CompileTestCase):
    def test_a_changed_constant_recompiles(self):
        net = Net()
        compiled = self.compile(net, inner="eager", fullgraph=True)
        x = torch.randn(3, 4)
        for extra in (Plain(2, torch.ones(4)), Plain(5, torch.ones(4)), Shift(2.0, torch.ones(4)),
                      Shift(3.0, torch.ones(4))):
            torch.testing.assert_close(compiled(x, extra), net(x, extra))

    def test_an_object_made_inside_the_compiled_frame_with_a_none_attribute(self):
        # as a transformers model makes its DynamicCache inside forward; torch 2.11's Dynamo
        # broke the graph on dataclasses.is_dataclass(None) there
        class MakesItsOwn(Net):
            def forward(self, x, extra):
                counter = Counter(calls=2)  # counter.last is None
                return self.leaf(self.inp(x), extra=counter).relu() + counter.last

        net = MakesItsOwn()
        compiled = self.compile(net, inner="eager", fullgraph=True)
        x = torch.randn(3, 4)
        torch.testing.assert_close(compiled(x, None), net(x, None))
        self.assertEqual(graph_breaks(), 0)

    def test_a_number_the_leaf_changes_after_it_became_dynamic(self):
        # calls=1, then 2, 3: Dynamo recompiles with calls as a symbol, and the leaf returns
        # calls + 1, a symbol of its own making (torch 2.11: fixed and guarded, one graph a value)
        net = Net()
        compiled = self.compile(net, inner="eager", fullgraph=True)
        x = torch.randn(3, 4)
        for calls in (1, 2, 3, 2):
            mine, theirs = Counter(calls=calls), Counter(calls=calls)
            torch.testing.assert_close(compiled(x, mine), net(x, theirs))
            self.assertEqual((mine.calls, type(mine.calls)), (theirs.calls, int))
            torch.testing.assert_close(mine.last, theirs.last)
        self.assertEqual(graph_breaks(), 0)

    def test_an_attribute_that_cannot_be_copied_is_a_clear_error(self):
        net = Net()
        extra = Plain(2, torch.ones(4))
        extra.callback = nn.Linear(2, 2)  # a module inside the argument
        with self.assertRaises(Exception) as caught:
            self.compile(net, inner="eager", fullgraph=True)(torch.randn(3, 4), extra)
        text = str(caught.exception)
        self.assertIn("leaf Scaled", text)
        self.assertIn("extra.callback = Linear", text)
        self.assertIn("module._z3_leaf = False", text)

    def test_error_class_is_public_through_the_message(self):
        self.assertTrue(issubclass(LeafArgumentError, TypeError))
