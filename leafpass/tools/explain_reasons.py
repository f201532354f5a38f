"""One line for what went wrong: a Dynamo break reason, or an error and its causes."""

from __future__ import annotations

import ast
import re

__all__ = ["first_line_of_error", "leaf_argument_error", "summarize_reason"]


_EXPLANATION = re.compile(r"^\s*Explanation:\s*(.*)$", re.M)
# Dynamo traces leafpass's copy of a leaf's object arguments, so a LeafArgumentError raised
# there is one Dynamo catches ("Observed exception"): it runs the frame eagerly, where the leaf
# takes the object as it is, and the error is left only in the reason's debug context:
# `raised exception LeafArgumentError("leafpass: leaf Block is called with ...")` (torch 2.12+;
# torch 2.11 writes the argument's tracker: `LeafArgumentError((ConstantVariable(str: "..."),))`).
_LEAF_ARGUMENT_ERROR = re.compile(
    r"""LeafArgumentError\((?:\(ConstantVariable\(str: )?(?P<text>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\)"""
)


def leaf_argument_error(text: str) -> str | None:
    """``LeafArgumentError: leaf Block is called with ARG = TYPE, ...`` (the leaf, the argument's
    path and the fix, as leafpass raised it) when a Dynamo break reason holds one, else None."""
    match = _LEAF_ARGUMENT_ERROR.search(text or "")
    if match is None:
        return None
    try:
        message = ast.literal_eval(match.group("text"))
    except (ValueError, SyntaxError):
        return None
    return f"LeafArgumentError: {message.removeprefix('leafpass: ')}"


def summarize_reason(text: str) -> str:
    """One line for a Dynamo break reason: its first line, plus the explanation if any; a
    leafpass error Dynamo caught (:func:`leaf_argument_error`) is shown as that error."""
    text = (text or "").strip()
    if not text:
        return "(no reason recorded)"
    caught = leaf_argument_error(text)
    if caught is not None:
        return caught
    if text.startswith("generic_jump "):  # the frame's own branch; the message Dynamo logs is elsewhere
        return f"Data-dependent branching: a branch on {text[len('generic_jump '):]} (Dynamo generic_jump)"
    first = text.splitlines()[0].strip()
    match = _EXPLANATION.search(text)
    if match and match.group(1).strip() and match.group(1).strip() not in first:
        return f"{first}: {match.group(1).strip()}"
    return first


def first_line_of_error(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line`` of the error that says what went wrong, one line.

    Dynamo wraps what a backend or a leaf raised (``TorchRuntimeError``,
    ``BackendCompilerFailed``, ``InternalTorchDynamoError``) in messages that carry the
    whole user stack. Of the chain of causes, a leafpass error is taken (its message
    names the leaf and the fix), else the innermost cause.
    """
    chain = [exc]
    while len(chain) < 50:
        last = chain[-1]
        nxt = last.__cause__ if last.__cause__ is not None else last.__context__  # Dynamo raises `from None`
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    ours = [e for e in chain if type(e).__module__.split(".")[0] == "leafpass"]
    exc = ours[0] if ours else chain[-1]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
