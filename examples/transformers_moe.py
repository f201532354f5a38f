"""A tiny Hugging Face Mixtral trained a few SGD steps, compiled with z3leaf in one graph.

    pip install 'leafpass[transformers]'
    python examples/transformers_moe.py                  # inner compiler aot_eager (fast)
    python examples/transformers_moe.py --inner inductor # what backend="z3leaf" uses by default

The model is built from a config (random weights, no download) with
``experts_implementation="eager"``: its experts find their tokens with ``nonzero`` and
loop over the experts hit, which breaks a ``torch.compile`` graph. DeepSpeed's default
leaf config (``zero_optimization.leaf_module`` left out, applied here with
``leafpass.apply_leaf_module_config(model, {})``) flags every ``MixtralSparseMoeBlock``,
so with ``backend="z3leaf"`` the whole training step's forward is one graph
(``fullgraph=True``) with one ``prefetch_all`` and one opaque call per MoE block.

The script trains the compiled model and an eager copy side by side, prints each step's
loss, the number of graphs and the leaf lines of the graph, and exits with status 1 if
the graph count, the graph breaks or the losses are not as expected.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import leafpass  # noqa: E402


def fail(message: str) -> None:
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def tiny_mixtral(layers: int):
    try:
        from transformers import AutoModelForCausalLM, MixtralConfig
    except ImportError:
        fail("this example needs transformers: pip install 'leafpass[transformers]'")
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, experts_implementation="eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", default="aot_eager", choices=["inductor", "aot_eager", "eager"],
                        help="compiler for the parts of the graph outside the leaves")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = tiny_mixtral(args.layers).train()
    leaves = leafpass.apply_leaf_module_config(model, {})  # DeepSpeed's default leaf classes
    names = [n for n, m in model.named_modules() if leafpass.z3_leaf_module(m)]
    print(f"flagged {len(leaves)} leaves: {names}")
    if len(leaves) != args.layers:
        fail(f"expected one MixtralSparseMoeBlock leaf per layer, got {names}")

    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="z3leaf", options={"inner": args.inner}, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    with leafpass.record_graphs() as rec:
        for step in range(args.steps):
            ids = torch.randint(0, 64, (2, 16), generator=generator)
            loss = compiled(input_ids=ids, labels=ids).loss
            ref_loss = reference(input_ids=ids, labels=ids).loss
            loss.backward()
            ref_loss.backward()
            optimizer.step()
            ref_optimizer.step()
            optimizer.zero_grad()
            ref_optimizer.zero_grad()
            print(f"step {step}: loss {loss.item():.6f}  (eager {ref_loss.item():.6f})")
            if not torch.allclose(loss, ref_loss, rtol=1e-4, atol=1e-5):
                fail(f"compiled loss {loss.item()} differs from eager {ref_loss.item()} at step {step}")

    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    print(f"graphs: {len(rec.graphs)}, graph breaks: {breaks}")
    if len(rec.graphs) != 1 or breaks:
        fail(f"expected 1 graph and no graph break, got {len(rec.graphs)} graphs and {breaks} breaks")
    lines = leafpass.format_graph(rec.graphs[0]).splitlines()
    print(f"leaf lines of the graph ({len(lines)} lines in all):")
    for index, line in enumerate(lines):
        if line.startswith("prefetch_all"):
            print("  " + line)
            print("  " + lines[index + 1])
    print(f"OK: one graph, losses match eager over {args.steps} SGD steps")


if __name__ == "__main__":
    main()
