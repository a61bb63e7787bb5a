"""Running a stage command: a user error is one line on stderr and exit status 2, not a traceback."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from safealign.core.errors import MissingWeights, UserError


def run(main: Callable[..., Any], *args: Any) -> int:
    """Call ``main(*args)``; return its int status (0 for None). ``UserError``, ``MissingWeights`` and
    ``FileNotFoundError`` print ``error: <message>`` and return 2. Set SAFEALIGN_TRACEBACK=1 to see the trace."""
    try:
        status = main(*args)
    except (UserError, MissingWeights, FileNotFoundError) as e:
        if os.environ.get("SAFEALIGN_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(status or 0)
