"""Rewrites of the adaptive path's small operators, timed in a run's ``predict`` (issue 21).

* ``library_attention``: the one rewrite shipped, switched off: attention over two keys back on the library kernel
  instead of its closed form (``backbone.layers.attention.attention``); its speed-up under 1 is what the form gains.

Not shipped (each measured within the machine's noise):

* ``fused_stem``: each stem convolution and its GELU as one oneDNN call (``torch.ops.mkldnn._convolution_pointwise``,
  the fusion inductor uses on CPU) instead of a convolution and a separate GELU.
* ``small_attention``: latent attention over at most 8 keys as two batched matmuls and a softmax instead of
  ``F.scaled_dot_product_attention``, whose CPU kernel is made for long sequences (timed before the two-key form;
  today it covers only the calls that still reach the library kernel).
* ``compiled``: the backbone pieces ``predict`` calls per batch (embedding, stem continuation, read, probe, grouped
  block, head) compiled by ``torch.compile`` (inductor, dynamic batch), the option issue 21 names; the first pass
  compiles every group layout the images need, so the timed passes run warm.

Each variant is switched on around its own passes of ``AdaptiveClassifier.predict`` over the same test images,
alternating with the code as it is in one process (paired medians), and must give the same labels::

    python -m benchmarks.operator_variants --policy docs/results/demo_p0.3 [--variants compiled] [--repeats 9]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F

from backbone.allocator import reuse_freed_memory
from backbone.data import DataError
from backbone.data_source import resolve_data
from backbone.fileio import write_json
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.layers import attention as attention_module
from backbone.layers.stem import ConvStem
from backbone.model import AdaPerceiver
from backbone.option_checks import int_at_least
from benchmarks.timing import cpu_description, images_per_second
from envs import observations
from policy.adaptive import AdaptiveClassifier
from policy.sidecar import resolve_run

SMALL_KEYS = 8  # attention over at most this many keys takes the explicit path in `small_attention`
_LIBRARY_ATTENTION = F.scaled_dot_product_attention
# what predict calls once per batch or group; run_probe (read, block 1, head) is compiled whole
COMPILED_METHODS = ("embed", "continue_embed", "read_latents", "forward_block_grouped_unchecked", "forward_head")
RECOMPILE_LIMIT = 64  # one graph per layout of width groups a block meets (dynamo's default of 8 is too few)


def _fused_features(stem: ConvStem, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``ConvStem.features`` with each convolution and its GELU (exact, erf) in one oneDNN primitive."""
    x = x.to(stem.proj.weight.dtype)
    for conv in stem.convs[2 * start : 2 * stop : 2]:
        x = torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, "gelu", [None], "none"
        )
    return x


def _explicit_attention(q, k, v, attn_mask=None, **kwargs):
    """``softmax(q k^T / sqrt(d)) v`` as batched matmuls for few keys; anything else goes to the library kernel."""
    if kwargs or k.shape[-2] > SMALL_KEYS:
        return _LIBRARY_ATTENTION(q, k, v, attn_mask=attn_mask, **kwargs)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@contextlib.contextmanager
def library_attention() -> Iterator[None]:
    with mock.patch.object(attention_module, "TWO_KEY_MIN_ROWS", sys.maxsize):
        yield


@contextlib.contextmanager
def fused_stem() -> Iterator[None]:
    with mock.patch.object(ConvStem, "features", _fused_features):
        yield


@contextlib.contextmanager
def small_attention() -> Iterator[None]:
    with mock.patch.object(F, "scaled_dot_product_attention", _explicit_attention):
        yield


@functools.cache
def _compiled_pieces(backend: str) -> dict[str, Callable]:
    """One compiled wrapper per piece and backend, kept, so each entry of :func:`compiled` finds its graphs warm."""
    functions = {name: getattr(AdaPerceiver, name) for name in COMPILED_METHODS} | {"run_probe": observations.run_probe}
    return {name: torch.compile(fn, dynamic=True, backend=backend) for name, fn in functions.items()}


@contextlib.contextmanager
def compiled(backend: str = "inductor") -> Iterator[None]:
    """The backbone's per-batch pieces and the probe compiled with dynamic batch (tests use ``backend="eager"``:
    the same capture without inductor's minutes of code generation)."""
    pieces = _compiled_pieces(backend)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                                       accumulated_recompile_limit=8 * RECOMPILE_LIMIT))  # fmt: skip
        for name in COMPILED_METHODS:
            stack.enter_context(mock.patch.object(AdaPerceiver, name, pieces[name]))
        stack.enter_context(mock.patch.object(observations, "run_probe", pieces["run_probe"]))
        yield


VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "library_attention": library_attention,
    "fused_stem": fused_stem,
    "small_attention": small_attention,
    "compiled": compiled,
}


def compare_variants(
    clf: AdaptiveClassifier, images: torch.Tensor, batch: int, repeats: int, variants: list[str] | None = None
) -> dict:
    """images/s of ``predict`` as it is and under each variant, in paired passes; labels and logits compared."""
    variants = list(VARIANTS) if variants is None else variants
    arms = {"as_is": contextlib.nullcontext, **{name: VARIANTS[name] for name in variants}}
    with torch.inference_mode():
        reference = clf.predict(images[:batch])
        checks = {}
        for name in variants:
            with VARIANTS[name]():
                t0 = time.perf_counter()
                out = clf.predict(images[:batch])
                first_call_s = time.perf_counter() - t0
            checks[name] = {"same_labels": bool(torch.equal(out.labels, reference.labels)),
                            "max_abs_logit_diff": float((out.logits - reference.logits).abs().max()),
                            "first_call_s": round(first_call_s, 2)}  # fmt: skip
    runs: dict[str, list[float]] = {name: [] for name in arms}
    for arm in arms.values():  # warm-up over every batch: oneDNN primitives, allocator, compiled graphs
        with arm():
            images_per_second(clf.predict, images, batch)
    for r in range(repeats):
        for name, arm in list(arms.items())[:: 1 if r % 2 == 0 else -1]:
            with arm():
                runs[name].append(images_per_second(clf.predict, images, batch))
    return {
        "img_s": {name: statistics.median(v) for name, v in runs.items()},
        "img_s_runs": runs,
        "speedup": {
            name: statistics.median(a / b for a, b in zip(runs[name], runs["as_is"], strict=True)) for name in variants
        },
        "checks": checks,
    }


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.operator_variants", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--policy", default="docs/results/demo_p0.3", help="run folder written by train_policy.py")
    parser.add_argument("--images", type=int_at_least(1), default=2048, help="test images (default 2048)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=256, help="images per call (default 256)")
    parser.add_argument(
        "--repeats", type=int_at_least(1), default=9, help="paired timed passes (median reported; default 9)"
    )
    parser.add_argument("--threads", type=int_at_least(0), default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to time against the code as it is (default: all)")  # fmt: skip
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: the usual search)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if not torch.backends.mkldnn.is_available():
        print("error: this torch build has no oneDNN (mkldnn), which the fused_stem variant calls", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the inference commands do
    try:
        source = resolve_data(resolve_run(args.policy)[1].get("data"), args.data_dir)
        images = source.dataset("test").subset(args.images).as_float()
        clf = AdaptiveClassifier.load(args.policy)
        result = compare_variants(clf, images, args.batch_size, args.repeats, args.variants)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.policy}: {len(images)} test images, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(
        "| variant | img/s | as is, img/s | speed-up (paired median) | same labels | largest logit difference "
        "| first call s |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    for name in args.variants:
        check = result["checks"][name]
        img_s, as_is = result["img_s"][name], result["img_s"]["as_is"]
        print(f"| {name} | {img_s:.0f} | {as_is:.0f} | {result['speedup'][name]:.3f}x | {check['same_labels']} "
              f"| {check['max_abs_logit_diff']:.1e} | {check['first_call_s']} |")  # fmt: skip
    if args.json:
        command = "python -m benchmarks.operator_variants " + " ".join(argv if argv is not None else sys.argv[1:])
        meta = {"command": command, "policy": args.policy, "images": len(images), "batch_size": args.batch_size,
                "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "cpu": cpu_description()}  # fmt: skip
        write_json(args.json, {**meta, **result}, indent=1)
    return 0 if all(c["same_labels"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
