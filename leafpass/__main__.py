"""``python -m leafpass COMMAND``: ``demo`` (the default) and ``explain``."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "train a small MoE under DeepSpeed ZeRO-3 on 2 CPU ranks, compiled with z3leaf, and compare",
    "explain": "compile a model with z3leaf and report its leaves, graphs, breaks and prefetches",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m leafpass {demo,explain} [options]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command == "demo":
        from .tools.demo import main as run
    elif command == "explain":
        from .tools.explain import main as run
    else:
        print(f"leafpass: unknown command {command!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
