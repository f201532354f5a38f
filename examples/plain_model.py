"""A plain PyTorch MoE model, its MoE blocks flagged as ZeRO-3 leaves, compiled with z3leaf.

    python examples/plain_model.py                  # inner compiler aot_eager (fast)
    python examples/plain_model.py --inner inductor # what backend="z3leaf" uses by default

``TwoMoE`` is ``Linear -> MoEBlock -> Linear -> MoEBlock``. An ``MoEBlock`` finds each
expert's tokens with ``nonzero`` and skips experts that got none, which breaks a
``torch.compile`` graph. Flagged as leaves, both blocks stay opaque: the script prints the
single graph (one ``prefetch_all`` then one call per leaf), checks there was no graph break
and no recompile over a few steps, and checks outputs and every gradient against eager.
It exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch._dynamo

import leafpass
from leafpass.testing.models import MoEBlock, TwoMoE


def fail(message: str) -> None:
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"],
                        help="compiler for the parts of the graph outside the leaves")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TwoMoE(d=16)
    leaves = leafpass.set_z3_leaf_modules(model, [MoEBlock])
    print(f"flagged {len(leaves)} leaves: {[n for n, m in model.named_modules() if leafpass.z3_leaf_module(m)]}")
    reference = copy.deepcopy(model)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="z3leaf", options={"inner": args.inner}, fullgraph=True)
    with leafpass.record_graphs() as rec:
        for step in range(args.steps):
            x = torch.randn(6, 16)
            out, ref = compiled(x), reference(x)
            try:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            except AssertionError as error:
                fail(f"output differs from eager at step {step}: {error}")
            out.pow(2).sum().backward()
            ref.pow(2).sum().backward()
            for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
                if (p.grad is None) != (q.grad is None):
                    fail(f"gradient of {name} present in one run only at step {step}")
                if p.grad is not None and not torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5):
                    fail(f"gradient of {name} differs from eager at step {step}")
            print(f"step {step}: loss {out.pow(2).sum().item():.6f}, eager {ref.pow(2).sum().item():.6f}, "
                  f"tokens per expert {model.moe1.last_expert_tokens} {model.moe2.last_expert_tokens}")

    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    print(f"graphs: {len(rec.graphs)}, graph breaks: {breaks}")
    if len(rec.graphs) != 1 or breaks:
        fail(f"expected 1 graph and no graph break, got {len(rec.graphs)} graphs and {breaks} breaks")
    print(leafpass.format_graph(rec.graphs[0]))
    print(f"OK: one graph, outputs and gradients match eager over {args.steps} steps")


if __name__ == "__main__":
    main()
