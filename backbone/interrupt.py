"""Ctrl-C in a command: one line on stderr and exit code 130, never a traceback.

Commands that save work on the way (training, controller runs, the ablation) catch the interrupt themselves and
say what was saved and how to resume; the others write their outputs only at the end, so there is nothing to keep.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def exits_cleanly_on_ctrl_c(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main(argv)``: Ctrl-C prints ``interrupted: nothing written`` and returns 130."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("interrupted: nothing written (this command saves its results only when it finishes)",
                  file=sys.stderr)  # fmt: skip
            return EXIT_INTERRUPTED

    return wrapper
