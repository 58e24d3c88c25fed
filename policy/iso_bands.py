"""Why the iso cascade misses on test what it meets on policy-train: the probe against the setting it hands over to,
band by band of the probe's confidence, on both splits. A diagnosis of a reported result; nothing here is fitted.

    python -m policy.iso_bands --setting s3/4/4/32 --out docs/results/iso_bands

A probe cascade answers with the probe when its top-1 probability is at least tau, else runs setting X. Lowering tau
from 1 changes its accuracy only through the images in the band it uncovers where the probe and X disagree on
correctness: ``probe_wrong`` (X right, the probe wrong: a point lost) against ``probe_right`` (the reverse: a point
won). This counts both per band on policy-train (where every controller is fitted) and on test (where it is scored),
with Fisher's exact test of whether the two splits' counts differ, and lists the cascade's accuracy and FLOPs at
every tau on both splits. The last table is the best cascade *chosen on test* under the iso-accuracy budget: a bound
that says whether a cascade could reach the point at all, not a controller.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

import numpy as np
from scipy.stats import fisher_exact

from envs import get_observation
from envs.observations import probe_setting
from policy.baselines import cascade_outcome
from policy.cascade import CASCADE_TAUS, OBSERVATION, all_cascades
from policy.config import DEFAULT_POLICY_CONFIG, build_policy_config
from policy.evaluation import format_p
from policy.report_cli import add_table_options, print_and_write_report
from policy.training import load_backbone_for, outcome_table

BAND_EDGES = (0.0, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99, 1.0)  # of the probe's top-1 probability; the last band is closed
TAUS = tuple(t for t in CASCADE_TAUS if 0.85 <= t <= 1)  # around the fitted iso cascades' thresholds (0.87-0.92)


def band_counts(confidence: np.ndarray, probe_ok: np.ndarray, x_ok: np.ndarray, edges=BAND_EDGES) -> list[dict]:
    """Per band ``[lo, hi)`` of the probe's confidence (the last one ``[lo, hi]``): images, the probe's and X's
    accuracy there, and the images only the probe gets wrong (``probe_wrong``) or only it gets right."""
    rows = []
    for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
        last = k == len(edges) - 2
        m = (confidence >= lo) & ((confidence <= hi) if last else (confidence < hi))
        n = int(m.sum())
        rows.append({
            "band": [lo, hi], "images": n,
            "probe_accuracy": float(probe_ok[m].mean()) if n else None,
            "x_accuracy": float(x_ok[m].mean()) if n else None,
            "probe_wrong": int((~probe_ok[m] & x_ok[m]).sum()),
            "probe_right": int((probe_ok[m] & ~x_ok[m]).sum()),
        })  # fmt: skip
    return rows


def best_within(acc: np.ndarray, cost: np.ndarray, budget: float) -> tuple[int, ...] | None:
    """Index of the most accurate entry that costs at most ``budget`` (the first of ties), None if none does."""
    if not (cost <= budget).any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.where(cost <= budget, acc, -1.0).argmax()), acc.shape))


def parse_setting(grid, text: str) -> tuple[int, ...]:
    """Grid index of a setting written as the reports write it (``s3/4/4/32``: stage/tokens/depth/width)."""
    for index in grid.indices():
        if str(grid.setting(index)) == text:
            return tuple(int(i) for i in index)
    raise ValueError(f"setting {text!r} is not in the settings grid (e.g. {grid.full}, {grid.smallest})")


def run_iso_bands(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("backbone", "data", "data_dir", "cache_dir", "train_limit")
    cfg = build_policy_config(args.config, observation=OBSERVATION, **{k: getattr(args, k) for k in keys})
    model = load_backbone_for(cfg.backbone)
    limits = {cfg.train_split: cfg.train_limit, cfg.eval_split: args.eval_limit or 0}
    tables = {split: outcome_table(model, cfg, split, n) for split, n in limits.items()}
    grid = tables[cfg.eval_split].grid
    x = parse_setting(grid, args.setting) if args.setting else grid.full_index
    spec = get_observation(OBSERVATION)
    reused, overhead = spec.reused_flops(model), spec.flops(model)
    probe = tuple(int(i) for i in grid.index(probe_setting(model)))
    result: dict[str, Any] = {
        "command": "python -m policy.iso_bands " + " ".join(sys.argv[1:]),
        "backbone_sha256": model.checkpoint_sha256, "probe": str(grid.setting(probe)), "setting": str(grid.setting(x)),
        "splits": {},
    }  # fmt: skip
    for split, t in tables.items():
        col = (slice(None),)
        full_ok = t.correct[(*col, *grid.full_index)]
        per_tau = []
        for tau in TAUS:
            ok, cost = cascade_outcome(t.correct, t.confidence, grid.flops, reused, overhead, tau, x, probe)
            per_tau.append({"tau": tau, "accuracy": float(ok.mean()), "mean_flops": float(cost.mean()),
                            "gap": float(full_ok.mean() - ok.mean())})  # fmt: skip
        fixed = t.correct.mean(0)
        as_accurate = grid.flops[fixed >= full_ok.mean() - 0.001]  # the iso point's "within 0.1 points"
        result["splits"][split] = {
            "images": len(t),
            "full_accuracy": float(full_ok.mean()),
            "x_accuracy": float(t.correct[(*col, *x)].mean()),
            "cheapest_fixed_as_accurate_flops": int(as_accurate.min()),
            "bands": band_counts(t.confidence[(*col, *probe)], t.correct[(*col, *probe)], t.correct[(*col, *x)]),
            "cascade": per_tau,
        }
    train, test = (result["splits"][s]["bands"] for s in (cfg.train_split, cfg.eval_split))
    for a, b in zip(train, test, strict=True):
        counts = [[a["probe_wrong"], a["probe_right"]], [b["probe_wrong"], b["probe_right"]]]
        b["fisher_p_vs_train"] = float(fisher_exact(counts).pvalue) if min(map(sum, counts)) else None
    t, s = tables[cfg.eval_split], result["splits"][cfg.eval_split]
    budget = 0.75 * s["cheapest_fixed_as_accurate_flops"]
    acc, cost, _ = all_cascades(model, t)  # every (tau, X), priced as the fitted cascades are
    result["chosen_on_test"] = {"budget_flops": budget}
    best = best_within(acc, cost, budget)
    if best is not None:
        result["chosen_on_test"] |= {"tau": CASCADE_TAUS[best[0]], "setting": str(grid.setting(best[1:])),
                                     "accuracy": float(acc[best]), "mean_flops": float(cost[best]),
                                     "gap": s["full_accuracy"] - float(acc[best])}  # fmt: skip
    return result


def format_markdown(result: dict[str, Any]) -> str:
    splits = list(result["splits"])
    lines = [
        f"# The probe ({result['probe']}) against X = {result['setting']}, band by band of its confidence",
        "",
        f"Command: `{result['command']}`  ",
        f"Backbone sha256: `{result['backbone_sha256']}`",
        "",
    ]
    for split, s in result["splits"].items():
        cheapest = s["cheapest_fixed_as_accurate_flops"] / 1e6
        accuracy = f"full setting {s['full_accuracy']:.2%}, X {s['x_accuracy']:.2%}"
        lines.append(f"- {split}: {s['images']} images, {accuracy}, cheapest fixed setting within 0.1 points of full: "
                     f"{cheapest:.2f} MFLOPs")  # fmt: skip
    head = " | ".join(f"{s}: images, probe / X accuracy, probe wrong : right" for s in splits)
    lines += ["", "Per band (probe wrong : right = images only the probe gets wrong : only it gets right, against X):",
              "", f"| probe confidence | {head} | Fisher p |", "|---|" + "---:|" * (len(splits) + 1)]  # fmt: skip
    for k, band in enumerate(result["splits"][splits[0]]["bands"]):
        cells = []
        for split in splits:
            b = result["splits"][split]["bands"][k]
            accs = "-" if not b["images"] else f"{b['probe_accuracy']:.1%} / {b['x_accuracy']:.1%}"
            cells.append(f"{b['images']}, {accs}, {b['probe_wrong']} : {b['probe_right']}")
        lo, hi = band["band"]
        closing = "]" if k == len(result["splits"][splits[0]]["bands"]) - 1 else ")"
        p = result["splits"][splits[-1]]["bands"][k]["fisher_p_vs_train"]
        lines.append(f"| [{lo:g}, {hi:g}{closing} | {' | '.join(cells)} | {format_p(p)} |")
    lines += ["", "The cascade (probe if its confidence >= tau, else X) at each tau, gap = full setting - cascade:", "",
              "| tau | " + " | ".join(f"{s}: accuracy @ MFLOPs (gap)" for s in splits) + " |",
              "|---:|" + "---:|" * len(splits)]  # fmt: skip
    for k, row in enumerate(result["splits"][splits[0]]["cascade"]):
        cells = (result["splits"][s]["cascade"][k] for s in splits)
        text = (f"{c['accuracy']:.2%} @ {c['mean_flops'] / 1e6:.2f} ({c['gap'] * 100:+.2f})" for c in cells)
        lines.append(f"| {row['tau']:g} | " + " | ".join(text) + " |")
    c = result["chosen_on_test"]
    head = (
        f"Chosen on {splits[-1]} (a bound, not a controller): the most accurate cascade at <= "
        f"{c['budget_flops'] / 1e6:.2f} MFLOPs (25% under the cheapest fixed setting as accurate as full)"
    )
    if "tau" not in c:
        lines += ["", f"{head}: none, every cascade costs more."]
    else:
        lines += [
            "",
            f"{head} is tau {c['tau']:g}, X = {c['setting']}: {c['accuracy']:.2%} at "
            f"{c['mean_flops'] / 1e6:.2f} MFLOPs, {c['gap'] * 100:+.2f} points from the full setting.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m policy.iso_bands",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbone", help="backbone .safetensors (default: the shipped checkpoint)")
    parser.add_argument("--setting", help="X, the setting the probe hands over to, as stage/tokens/depth/width "
                        "(e.g. s3/4/4/32; default: the full setting)")  # fmt: skip
    parser.add_argument("--out", default="runs/iso_bands", help="folder for iso_bands.{json,md}")
    parser.add_argument("--config", default=str(DEFAULT_POLICY_CONFIG), help="PolicyConfig YAML: data and splits")
    add_table_options(parser, eval_limit=True)
    args = parser.parse_args(argv)
    return print_and_write_report(lambda: run_iso_bands(args), format_markdown, args.out, "iso_bands")


if __name__ == "__main__":
    raise SystemExit(main())
