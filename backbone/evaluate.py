"""Accuracy of every fixed setting in one sweep (one ``forward_all`` pass per width).

    python -m backbone.evaluate [--checkpoint RUN/backbone.safetensors] --split test

Writes ``eval_<split>.json``, ``eval_<split>.md`` (a table of every setting) and ``eval_<split>.png`` (accuracy vs
FLOPs with the fixed-setting Pareto front) into ``--out`` (default: next to the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backbone.checkpoint import DEFAULT_BACKBONE, load_backbone
from backbone.distributed import local_device
from backbone.fileio import atomic_write, display_path, write_json, write_text
from backbone.interrupt import exits_cleanly_on_ctrl_c
from backbone.option_checks import int_at_least
from backbone.pareto import cheapest_within, significant_steps
from backbone.settings import Setting
from backbone.sweep import accuracy_grid

TOP_DROP = 0.001  # "as accurate as the full setting": within 0.1 points (issue 20's iso-accuracy tolerance)


def write_report(rows: list[dict], meta: dict, out: Path, stem: str, compare: dict | None = None) -> dict[str, Path]:
    """JSON + Markdown table + PNG plot of a settings sweep (``compare``: another report drawn on the same axes)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    full = max(rows, key=lambda r: r["flops"])
    small = min(rows, key=lambda r: r["flops"])
    flops, accuracy = [r["flops"] for r in rows], [r["accuracy"] for r in rows]
    steps = significant_steps(flops, accuracy, meta["samples"])
    top = rows[cheapest_within(flops, accuracy, TOP_DROP)]
    front = {
        "rise": full["accuracy"] - small["accuracy"],  # what the most compute buys over the least
        "smallest_flops_share": small["flops"] / full["flops"],
        "significant_steps": [str(Setting.of_row(rows[i])) for i in steps],  # rises by more than a standard error
        "top_start": str(Setting.of_row(top)),  # the cheapest setting within TOP_DROP of the full one
        "top_start_flops_share": top["flops"] / full["flops"],
    }
    write_json(paths["json"], {**meta, "front": front, "settings": rows}, indent=1)
    lines = [
        f"# Fixed-setting accuracy: `{meta['checkpoint']}` on `{meta['split']}` ({meta['samples']} images)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone sha256: `{meta['sha256']}`",
        "",
        f"- full setting {Setting.of_row(full)}: **{full['accuracy']:.2%}** at {full['flops'] / 1e6:.1f} MFLOPs",
        f"- smallest setting {Setting.of_row(small)}: **{small['accuracy']:.2%}** at {small['flops'] / 1e6:.1f} MFLOPs "
        f"({full['flops'] / small['flops']:.1f}x fewer)",
        f"- rise full - smallest: **{front['rise'] * 100:.2f} points**; front settings each more accurate than the "
        f"last by more than a standard error: **{len(steps)}** ({', '.join(front['significant_steps'])})",
        f"- the top of the front starts at {Setting.of_row(top)}, the cheapest setting within "
        f"{TOP_DROP * 100:.1f} points of the full one: **{top['accuracy']:.2%}** at {top['flops'] / 1e6:.2f} MFLOPs "
        f"({front['top_start_flops_share']:.1%} of the full setting's FLOPs)",
        "",
        "| setting | MFLOPs | accuracy | Pareto |",
        "|---|---:|---:|:---:|",
    ]
    lines += [
        f"| {Setting.of_row(r)} | {r['flops'] / 1e6:.2f} | {r['accuracy']:.2%} | {'*' if r['pareto'] else ''} |"
        for r in sorted(rows, key=lambda r: r["flops"])
    ]
    write_text(paths["md"], "\n".join(lines) + "\n")
    _plot(rows, meta, paths["png"], compare)
    return paths


def _plot(rows: list[dict], meta: dict, path: Path, compare: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    widths = sorted({r["width"] for r in rows})
    for marker, w in zip("o^sDv<>", widths, strict=False):
        pts = [r for r in rows if r["width"] == w]
        ax.scatter(
            [r["flops"] / 1e6 for r in pts],
            [100 * r["accuracy"] for r in pts],
            s=14,
            marker=marker,
            c=[r["depth"] for r in pts],
            cmap="viridis",
            alpha=0.8,
            label=f"width {w}",
        )
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["flops"])
    ax.step(
        [r["flops"] / 1e6 for r in front],
        [100 * r["accuracy"] for r in front],
        where="post",
        color="k",
        lw=1,
        label="Pareto front",
    )
    if compare is not None:
        other = sorted((r for r in compare["settings"] if r["pareto"]), key=lambda r: r["flops"])
        ax.step([r["flops"] / 1e6 for r in other], [100 * r["accuracy"] for r in other], where="post", color="0.5",
                ls="--", lw=1, label=f"Pareto front of {compare['sha256'][:12]} ({compare['split']})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (log scale)")
    ax.set_ylabel(f"top-1 accuracy on {meta['split']} (%)")
    ax.set_title("Fixed settings (colour = depth)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def read_report(path: str | Path) -> dict:
    """An ``eval_<split>.json`` written by this command; ValueError (naming ``--compare``) for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and {"settings", "sha256", "split"} <= set(data)):
        raise ValueError(f"--compare {path} is not an eval_<split>.json written by backbone.evaluate")
    return data


def default_out(checkpoint: str | Path, sha256: str) -> Path:
    """Where a report goes without ``--out``: the checkpoint's own folder (a training run's folder), or
    ``runs/eval__<sha256[:12]>`` in the working directory for the shipped checkpoint (package data is read-only)."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent == DEFAULT_BACKBONE.resolve().parent:
        return Path("runs") / f"eval__{sha256[:12]}"
    return checkpoint.parent


@exits_cleanly_on_ctrl_c
def main(argv: list[str] | None = None) -> int:
    from backbone.data import DataError
    from backbone.data_source import resolve_data

    parser = argparse.ArgumentParser(
        prog="python -m backbone.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=str(DEFAULT_BACKBONE), help="backbone .safetensors file")
    parser.add_argument("--split", default="test", help="backbone-train | policy-train | test")
    parser.add_argument(
        "--data",
        help="fmnist (default) or an image-folder root ROOT/<split>/<class>/<image> (the split read with the "
        "backbone's preprocessing; policy-train = ROOT/policy-train/ or the hold-out recorded in the backbone)",
    )
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader workers reading an image folder")
    parser.add_argument("--limit", type=int_at_least(0), default=0, help="evaluate the first N images only (0 = all)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=500, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device the backbone runs on (e.g. cuda)")
    parser.add_argument("--compare", help="eval_<split>.json of another backbone whose front is drawn on the same axes")
    parser.add_argument(
        "--out",
        help="folder for eval_<split>.{json,md,png} (default: the checkpoint's folder; runs/eval__<sha> for the "
        "shipped checkpoint)",
    )
    args = parser.parse_args(argv)
    try:
        compare = read_report(args.compare) if args.compare else None
        model = load_backbone(args.checkpoint, device=local_device(args.device))
        source = resolve_data(args.data, args.data_dir)
        source.check_backbone(model)
        if source.builtin:
            data = source.dataset(args.split)
            if args.limit:
                data = data.subset(args.limit)
        else:
            folder = source.split(args.split, model)
            data = (folder.subset(args.limit) if args.limit else folder).read_all(workers=args.workers)[0]
        t0 = time.perf_counter()
        acc = accuracy_grid(model, data.as_float(), data.labels, batch_size=args.batch_size, progress=True)
        rows = model.grid.table(acc)
    except (ValueError, FileNotFoundError, DataError) as e:  # JSONDecodeError and DataError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {
        "checkpoint": display_path(args.checkpoint),
        "sha256": model.checkpoint_sha256,
        **({} if source.builtin else {"data": source.spec}),
        "split": args.split,
        "samples": len(data),
        "eval_wall_s": round(time.perf_counter() - t0, 1),
        "command": "python -m backbone.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out) if args.out else default_out(args.checkpoint, model.checkpoint_sha256)
    paths = write_report(rows, meta, out, f"eval_{args.split}", compare)
    print(paths["md"].read_text().split("\n| setting")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
