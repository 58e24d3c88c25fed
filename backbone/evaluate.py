"""Accuracy of every fixed setting in one sweep (one ``forward_all`` pass per width).

    python -m backbone.evaluate --checkpoint checkpoints/adaperceiver_fmnist.safetensors --split test

Writes ``eval_<split>.json``, ``eval_<split>.md`` (a table of every setting) and ``eval_<split>.png`` (accuracy vs
FLOPs with the fixed-setting Pareto front) into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from backbone.checkpoint import DEFAULT_BACKBONE, atomic_write, load_backbone, write_json
from backbone.model import AdaPerceiver
from backbone.pareto import pareto_front


@dataclass
class Sweep:
    """Per-sample outcome of every setting: arrays of shape ``(n, K, L, M)``."""

    correct: np.ndarray  # bool
    loss: np.ndarray  # float32 cross-entropy
    pred: np.ndarray  # int16 predicted class
    confidence: np.ndarray  # float32 top-1 softmax probability (for confidence early exit)


@torch.no_grad()
def sweep(
    model: AdaPerceiver,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    widths: Sequence[int] | None = None,
    progress: bool = False,
) -> Sweep:
    """Run every (granularity, depth) for each width in ``widths`` (default: all) over ``images`` in [0, 1]."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    was_training = model.training
    model.eval()
    widths = list(model.cfg.widths if widths is None else widths)
    k, depth = len(model.cfg.token_granularities), model.cfg.depth
    shape = (len(images), k, depth, len(widths))
    correct, loss, pred = np.zeros(shape, bool), np.zeros(shape, np.float32), np.zeros(shape, np.int16)
    confidence = np.zeros(shape, np.float32)
    batches = [(m, s) for m in range(len(widths)) for s in range(0, len(images), batch_size)]
    for m, s in tqdm(batches, desc="settings sweep", unit="batch", disable=not progress):
        x, y = images[s : s + batch_size], labels[s : s + batch_size]
        logits = model.forward_all(x, width=widths[m])  # (b, K, L, C)
        p = logits.argmax(-1)
        ce = F.cross_entropy(logits.permute(0, 3, 1, 2), y[:, None, None].expand(-1, k, depth), reduction="none")
        correct[s : s + len(x), ..., m] = (p == y[:, None, None]).numpy()
        loss[s : s + len(x), ..., m] = ce.numpy()
        pred[s : s + len(x), ..., m] = p.numpy()
        confidence[s : s + len(x), ..., m] = logits.softmax(-1).amax(-1).numpy()
    model.train(was_training)
    return Sweep(correct, loss, pred, confidence)


def accuracy_grid(model: AdaPerceiver, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Accuracy ``(K, L, M)`` of every setting."""
    return torch.from_numpy(sweep(model, images, labels, **kwargs).correct.mean(0))


def flops_grid(model: AdaPerceiver) -> np.ndarray:
    """FLOPs ``(K, L, M)`` of every setting."""
    c = model.cfg
    return np.array(
        [[[model.flops(g, d, w) for w in c.widths] for d in range(1, c.depth + 1)] for g in c.token_granularities],
        dtype=np.int64,
    )


def settings_table(model: AdaPerceiver, accuracy: np.ndarray) -> list[dict]:
    """One row per setting with its FLOPs, accuracy and whether it is on the Pareto front."""
    flops = flops_grid(model)
    rows = [
        {"tokens": g, "depth": d + 1, "width": w, "flops": int(flops[k, d, m]), "accuracy": float(accuracy[k, d, m])}
        for k, g in enumerate(model.cfg.token_granularities)
        for d in range(model.cfg.depth)
        for m, w in enumerate(model.cfg.widths)
    ]
    front = set(pareto_front([r["flops"] for r in rows], [r["accuracy"] for r in rows]).tolist())
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    return rows


def write_report(rows: list[dict], meta: dict, out: Path, stem: str) -> dict[str, Path]:
    """JSON + Markdown table + PNG plot of a settings sweep."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_json(paths["json"], {**meta, "settings": rows}, indent=1)
    full = max(rows, key=lambda r: r["flops"])
    small = min(rows, key=lambda r: r["flops"])
    lines = [
        f"# Fixed-setting accuracy: `{meta['checkpoint']}` on `{meta['split']}` ({meta['samples']} images)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Backbone sha256: `{meta['sha256']}`",
        "",
        f"- full setting {full['tokens']}/{full['depth']}/{full['width']}: **{full['accuracy']:.2%}** at "
        f"{full['flops'] / 1e6:.1f} MFLOPs",
        f"- smallest setting {small['tokens']}/{small['depth']}/{small['width']}: **{small['accuracy']:.2%}** at "
        f"{small['flops'] / 1e6:.1f} MFLOPs ({full['flops'] / small['flops']:.1f}x fewer)",
        "",
        "| tokens | depth | width | MFLOPs | accuracy | Pareto |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    lines += [
        f"| {r['tokens']} | {r['depth']} | {r['width']} | {r['flops'] / 1e6:.2f} | {r['accuracy']:.2%} | "
        f"{'*' if r['pareto'] else ''} |"
        for r in sorted(rows, key=lambda r: r["flops"])
    ]
    text = "\n".join(lines) + "\n"
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text(text))
    _plot(rows, meta, paths["png"])
    return paths


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    widths = sorted({r["width"] for r in rows})
    for marker, w in zip("o^s", widths, strict=False):
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
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (log scale)")
    ax.set_ylabel(f"top-1 accuracy on {meta['split']} (%)")
    ax.set_title("Fixed settings (colour = depth)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def display_path(path: str) -> str:
    """Repo-relative when possible, so committed reports do not name one machine's folders."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    from backbone.data import load_split

    parser = argparse.ArgumentParser(
        prog="python -m backbone.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=str(DEFAULT_BACKBONE), help="backbone .safetensors file")
    parser.add_argument("--split", default="test", help="backbone-train | policy-train | test")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images only (0 = all)")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass")
    parser.add_argument("--out", default="docs/results", help="folder for eval_<split>.{json,md,png}")
    args = parser.parse_args(argv)
    try:
        model = load_backbone(args.checkpoint)
        data = load_split(args.split, args.data_dir)
        if args.limit:
            data = data.subset(args.limit)
        t0 = time.perf_counter()
        acc = accuracy_grid(model, data.as_float(), data.labels, batch_size=args.batch_size, progress=True)
        rows = settings_table(model, acc.numpy())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = {
        "checkpoint": display_path(args.checkpoint),
        "sha256": model.checkpoint_sha256,
        "split": args.split,
        "samples": len(data),
        "eval_wall_s": round(time.perf_counter() - t0, 1),
        "command": "python -m backbone.evaluate " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    paths = write_report(rows, meta, Path(args.out), f"eval_{args.split}")
    print(paths["md"].read_text().split("\n| tokens")[0])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
