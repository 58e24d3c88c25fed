"""Why attention over two keys has a closed form, and from how many rows: the library kernel against it, timed.

Settings with 2 latents attend over two keys (their blocks' self-attention, their write-out). This times
``F.scaled_dot_product_attention`` against :func:`backbone.layers.attention.two_key_attention` on the shapes
adaptive inference meets (8 heads of 16, one or two queries, SelfAttention's strided q/k/v) for a range of batch
sizes in one process, and checks that they agree. ``attention`` takes the closed form from ``TWO_KEY_MIN_ROWS``
rows (batch x heads x queries), where it starts to win::

    python -m benchmarks.two_key_attention [--threads 1] [--json docs/results/operator_variants/two_key_kernel.json]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from backbone.allocator import reuse_freed_memory
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.layers.attention import TWO_KEY_MIN_ROWS, two_key_attention
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description, median_seconds

HEADS, HEAD_DIM = 8, 16  # the default backbone's latent attention
FORMS = {"library_us": F.scaled_dot_product_attention, "closed_form_us": two_key_attention}


def time_two_keys(batch: int, queries: int, repeats: int) -> dict:
    """Median microseconds of both forms on one shape, their largest difference, and which one ``attention`` takes."""
    qkv = torch.randn(batch, 2, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)  # (3, batch, heads, 2, head_dim), strided
    q, k, v = qkv[0][:, :, :queries], qkv[1], qkv[2]
    rows = batch * HEADS * queries
    with torch.inference_mode():
        diff = float((two_key_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v)).abs().max())
        us = {name: 1e6 * median_seconds(lambda f=f: f(q, k, v), repeats, warmup=10) for name, f in FORMS.items()}
    return {"batch": batch, "queries": queries, "rows": rows, **us, "max_abs_diff": diff,
            "closed_form_used": rows >= TWO_KEY_MIN_ROWS}  # fmt: skip


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.two_key_attention", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batch-sizes", type=int_at_least(1), nargs="+", default=[1, 4, 8, 16, 32, 64, 256],
                        help="batch sizes to time (default 1 4 8 16 32 64 256)")  # fmt: skip
    parser.add_argument("--repeats", type=int_at_least(1), default=200, help="timed calls per shape (median; 200)")
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the inference commands do
    torch.manual_seed(0)
    rows = [time_two_keys(batch, queries, args.repeats) for batch in args.batch_sizes for queries in (1, 2)]
    print(f"attention over 2 keys, {HEADS} heads of {HEAD_DIM}, {torch.get_num_threads()} threads; "
          f"attention() takes the closed form from {TWO_KEY_MIN_ROWS} rows")  # fmt: skip
    print("| batch | queries | rows | library us | closed form us | library / closed form | taken | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|:---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['queries']} | {r['rows']} | {r['library_us']:.1f} | {r['closed_form_us']:.1f} "
              f"| {r['library_us'] / r['closed_form_us']:.2f}x | {'yes' if r['closed_form_used'] else 'no'} "
              f"| {r['max_abs_diff']:.1e} |")  # fmt: skip
    if args.json:
        command = "python -m benchmarks.two_key_attention " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = {"command": command, "threads": torch.get_num_threads(), "repeats": args.repeats, "seed": 0,
                "min_rows": TWO_KEY_MIN_ROWS, "torch": torch.__version__, "cpu": cpu_description()}  # fmt: skip
        write_json(args.json, {**meta, "rows": rows}, indent=1)
    return 0 if all(r["max_abs_diff"] < 1e-5 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
