"""Errors a user can act on, and their one-line formatting.

``UserError`` (and its subclasses) means bad input: a wrong params value, a malformed file, missing weights.
Stage commands report it as one line on stderr with exit status 2 (``safealign.core.cli``), never a traceback.
"""
from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """Bad input the user can fix; the message names the file, row or key and what is allowed."""


class ParamsError(UserError):
    """A params.yaml value is wrong; the message names the file, the key and what is allowed."""


class MissingWeights(RuntimeError):
    """The weights a detector, metric or model needs are not on this machine; the message says which and where."""


def validation_lines(errors: list[dict[str, Any]], source: str, prefix: str = "") -> list[str]:
    """pydantic ``ValidationError.errors()`` -> one ``"<source>: <prefix><dotted key>: <message>"`` line each."""
    lines = []
    for err in errors:
        key = (prefix + ".".join(str(x) for x in err["loc"])).rstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{source}: {key or '(top level)'}: {msg}")
    return lines
