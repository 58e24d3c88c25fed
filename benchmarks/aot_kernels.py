"""Where a compiled batch-1 path spends its time, kernel by kernel (the table behind ``policy.aot_batch1``'s forms).

    python -m benchmarks.aot_kernels --policy docs/results/demo_p0.3 --setting 3,0,5,1 [--calls 200] [--no-autotune]

Compiles the front and one setting (an action: stage, tokens, depth, width indices) as ``AotBatch1`` does, but with
inductor's kernel profiling on (``torch._inductor.config.cpp.enable_kernel_profile``: each generated kernel records
itself), into a throw-away folder (the user cache is not touched; about a minute per package with autotuning), runs
the path on one test image and prints ``torch.profiler``'s table by self time: the generated kernels
(``graph_N_cpp_fused_...``, ``graph_N_gemm_...``) next to the ATen calls the package falls back to
(``aoti_torch_cpu_*``). The recording adds time of its own: read the shares, and time paths with
``benchmarks.aot_batch1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch
import torch._inductor.config as inductor_config
from torch.profiler import profile

from backbone.data import DataError, load_split
from backbone.option_checks import int_at_least
from policy.adaptive import AdaptiveClassifier
from policy.aot_batch1 import AotBatch1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="one-shot or cascade run folder written by train_policy.py")
    parser.add_argument("--setting", help="the setting to profile as action indices, e.g. 3,0,5,1 (default: the front)")
    parser.add_argument("--calls", type=int_at_least(1), default=200, help="profiled calls (default 200)")
    parser.add_argument("--rows", type=int_at_least(1), default=25, help="table rows (default 25)")
    parser.add_argument("--no-autotune", action="store_true", help="compile without inductor's max-autotune")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as benchmarks.aot_batch1 times it
    try:
        clf = AdaptiveClassifier.load(args.policy)
        image = load_split("test").subset(1).as_float()[0]
        action = None if args.setting is None else tuple(int(i) for i in args.setting.split(","))
        if action is not None:
            clf.grid.setting(action)  # ValueError for an unknown setting, before anything compiles
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="aot_kernels.") as folder:
        aot = AotBatch1(clf, folder, lambda name: print(f"compiling {name} ...", file=sys.stderr, flush=True),
                        max_autotune=not args.no_autotune)  # fmt: skip
        with inductor_config.patch({"cpp.enable_kernel_profile": True}):
            tokens, features, latents = aot.front(image)[:3]
            if action is None:
                run, name = (lambda: aot.front(image)), "front"
            else:
                setting = aot._setting(action)
                run, name = (lambda: setting([tokens, features, latents])), f"setting {clf.grid.setting(action)}"
        for _ in range(20):
            run()
        with profile() as prof:
            for _ in range(args.calls):
                run()
    print(f"{name}, {args.calls} calls, one thread; per-call time = 'CPU time avg' x '# of Calls' / {args.calls}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=90))
    return 0


if __name__ == "__main__":
    sys.exit(main())
