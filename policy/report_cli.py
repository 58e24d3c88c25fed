"""What the commands that report on outcome tables share (``policy.ablation``, ``policy.recipe_cv``,
``policy.reference``, ``policy.iso_holdout``): the options that say which data and tables to use, and the tail that
prints a result's Markdown and writes it, or turns bad input into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from backbone.data import DataError
from backbone.fileio import write_json_and_markdown
from backbone.option_checks import int_at_least

INPUT_ERRORS = (ValueError, FileNotFoundError, DataError)  # bad input: one line and exit code 2, no traceback


def add_table_options(parser: argparse.ArgumentParser, eval_limit: bool = False) -> None:
    """``--data``, ``--data-dir``, ``--train-limit`` (and ``--eval-limit``) and ``--cache-dir``."""
    parser.add_argument("--data", help="fmnist (default) or an image-folder root ROOT/<split>/<class>/<image>")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder")
    parser.add_argument("--train-limit", type=int_at_least(0), help="first N policy-train images only (smoke tests)")
    if eval_limit:
        parser.add_argument("--eval-limit", type=int_at_least(0), help="first N test images only (smoke tests)")
    parser.add_argument("--cache-dir", help="outcome-table cache folder")


def print_and_write_report(
    compute: Callable[[], dict[str, Any]],
    format_markdown: Callable[[dict[str, Any]], str],
    out: str | os.PathLike,
    name: str,
) -> int:
    """Run ``compute``; print its result as Markdown and write ``out/name.{json,md}``. Exit code 0, or 2 after one
    ``error:`` line when the input is bad (nothing is written then)."""
    try:
        result = compute()
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    markdown = format_markdown(result)
    print(markdown)
    print("wrote " + ", ".join(map(str, write_json_and_markdown(out, name, result, markdown))))
    return 0
