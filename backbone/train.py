"""Joint (once-for-all) training of an AdaPerceiver backbone (DESIGN §2, "Joint training").

    python -m backbone.train --config configs/backbone_fmnist.yaml [key=value ...] [--resume RUN/train_state.pt]

Every step trains every setting at once: each sample draws an FFN width, the model runs ``N_max`` latents with
the block-causal mask, and the loss is the cross-entropy of the write-out at *every* token granularity and
*every* depth, depth ``l`` weighted by ``l`` (normalised). Deterministic for a given seed on one machine: the
data order of an epoch and all randomness of a step are seeded from (seed, epoch) and (seed, step), so a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from tqdm import tqdm

from backbone.checkpoint import atomic_write, save_backbone
from backbone.data import ImageDataset, load_image_folder, load_split
from backbone.evaluate import accuracy_grid
from backbone.factory import create_model
from backbone.model import AdaPerceiver
from backbone.settings_io import build_dataclass, dump_yaml, load_yaml, merge, parse_overrides
from backbone.teacher import distill_targets, load_teacher, save_teacher, train_teacher


@dataclass
class TrainConfig:
    """Options of a joint-training run; defaults are the shipped Fashion-MNIST recipe."""

    model: str = "adaperceiver_fmnist"  # named size (backbone.MODEL_NAMES)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # AdaPerceiverConfig fields to change
    split: str = "backbone-train"  # training split (train[:50000]); the policy split is never trained on
    image_folder: str | None = None  # train on a root/<class>/<image> tree instead of `split` (your own data)
    epochs: int = 22  # passes over the split
    batch_size: int = 256  # images per step
    lr: float = 2e-3  # peak AdamW learning rate, reached after warm-up
    min_lr: float = 1e-5  # final learning rate of the cosine schedule
    warmup_epochs: float = 1.0  # linear warm-up length
    weight_decay: float = 0.05  # AdamW decay (not applied to norms, biases, LayerScale: timm's default)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    loss_settings: str = "all"  # all = joint training; full = the largest setting only (measures what joint costs)
    augment: bool = False  # random shift by up to 2 px + horizontal flip (slows fitting; off by default)
    distill_weight: float = 0.0  # share of each loss term given to KL towards a CNN teacher (0 = plain CE)
    distill_temperature: float = 2.0  # softmax temperature of the distillation term
    teacher_epochs: int = 8  # epochs of the CNN teacher trained first when distill_weight > 0 (backbone.teacher)
    bf16: bool = True  # bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX; ~15% faster), else fp32
    seed: int = 0  # seeds model init, data order, widths and augmentation
    num_threads: int = 0  # torch intra-op threads (0 = torch's default)
    limit_train: int = 0  # train on the first n images only (0 = all); for smoke tests
    monitor_samples: int = 2000  # held-out policy-train images scored at each epoch end (progress only)
    checkpoint_every: int = 200  # steps between atomic training-state checkpoints
    out: str = "runs/backbone_fmnist"  # run folder: config.yaml, train_state.pt, log.jsonl, backbone.safetensors
    data_dir: str | None = None  # Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "adaperceiver-rl"  # Weights & Biases project of the run


def joint_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over granularities of the depth-weighted loss: ``sum_l l * loss(k, l) / sum_l l`` (logits ``(B,K,L,C)``).

    ``loss`` is the cross-entropy, or with ``teacher_logits`` ``(B, C)`` the distillation mix
    ``(1 - a) * CE + a * T^2 * KL(teacher_T || student_T)`` (Hinton et al.; a = distill_weight, T = temperature).
    """
    b, k, depth, c = logits.shape
    flat = logits.float().reshape(-1, c)
    per = F.cross_entropy(
        flat, labels.repeat_interleave(k * depth), label_smoothing=label_smoothing, reduction="none"
    ).view(b, k, depth)
    if teacher_logits is not None and distill_weight > 0:
        target = F.log_softmax(teacher_logits.float() / temperature, dim=-1).repeat_interleave(k * depth, dim=0)
        student = F.log_softmax(flat / temperature, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1).view(b, k, depth)
        per = (1 - distill_weight) * per + distill_weight * temperature**2 * kl
    weights = torch.arange(1, depth + 1, dtype=per.dtype, device=per.device)
    return (per.mean(dim=(0, 1)) * weights).sum() / weights.sum()


def random_shift_flip(images: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` px (zero fill) and flip half of them left-right."""
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    oy, ox = torch.randint(0, 2 * max_shift + 1, (2, b))
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(b) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


TEACHER_FILE = "teacher.safetensors"

# options that shape the optimisation trajectory: a resumed run must use the saved values
_SCHEDULE_KEYS = (
    "model",
    "model_overrides",
    "split",
    "image_folder",
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "label_smoothing",
    "grad_clip",
    "loss_settings",
    "augment",
    "distill_weight",
    "distill_temperature",
    "teacher_epochs",
    "bf16",
    "seed",
    "limit_train",
)


def _step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def train(cfg: TrainConfig, resume: str | None = None, data: ImageDataset | None = None) -> dict[str, Any]:
    """Run (or resume) joint training; returns a summary dict. ``data`` replaces the named split (tests)."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if not 0.0 <= cfg.distill_weight < 1.0:
        raise ValueError(f"distill_weight must be in [0, 1), got {cfg.distill_weight}")
    if cfg.loss_settings not in ("all", "full"):
        raise ValueError(f"loss_settings must be 'all' (joint training) or 'full', got {cfg.loss_settings!r}")
    if cfg.distill_temperature <= 0:
        raise ValueError(f"distill_temperature must be > 0, got {cfg.distill_temperature}")
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_overrides)
    # the held-out monitor scores Fashion-MNIST's policy split: only meaningful when training on its backbone split
    monitored = data is None and cfg.image_folder is None and cfg.split == "backbone-train"
    if data is None:
        data = _load_training_data(cfg, model)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.limit_train:
        data = data.subset(cfg.limit_train)
    n = len(data)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
    total_steps = steps_per_epoch * cfg.epochs

    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=cfg.min_lr,
        warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.lr * 0.01,
        t_in_epochs=False,
    )
    step, elapsed = 0, 0.0
    if resume:
        step, elapsed = _load_state(resume, model, optimizer, cfg)
    dump_yaml(cfg, out / "config.yaml")

    monitor = None
    if cfg.monitor_samples and monitored:
        held_out = load_split("policy-train", cfg.data_dir).subset(cfg.monitor_samples)
        monitor = (held_out.as_float(), held_out.labels)

    teacher, teacher_wall_s = None, 0.0
    if cfg.distill_weight > 0:
        teacher, teacher_wall_s = _teacher(cfg, model, data, out, resume)
        if monitor is not None:
            acc = (distill_targets(teacher, monitor[0]).argmax(-1) == monitor[1]).float().mean().item()
            print(f"teacher: held-out accuracy {acc:.4f}, trained in {teacher_wall_s:.0f} s", file=sys.stderr)

    use_bf16 = cfg.bf16 and native_bf16()
    if cfg.bf16 and not use_bf16:
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32", file=sys.stderr)
    run = _init_wandb(cfg, out)
    images, labels = data.images, data.labels
    widths = torch.tensor(model.cfg.widths)
    teacher_logits = None  # of every training image, computed once when the images are not augmented
    if teacher is not None and not cfg.augment:
        teacher_logits = torch.cat([distill_targets(teacher, chunk.float() / 255.0) for chunk in images.split(1000)])
    log_file = (out / "log.jsonl").open("a")
    bar = tqdm(total=total_steps, initial=step, desc="joint training", unit="step", dynamic_ncols=True)
    t_last, loss_ema = time.perf_counter(), None
    model.train()
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, -1 - epoch)))
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        torch.manual_seed(_step_seed(cfg.seed, step))  # all randomness of this step
        x = images[idx]
        x = (random_shift_flip(x) if cfg.augment else x).float() / 255.0
        w = sample_widths(widths, len(idx)) if cfg.loss_settings == "all" else None
        scheduler.step_update(num_updates=step)
        soft = None
        if teacher is not None:
            soft = teacher_logits[idx] if teacher_logits is not None else distill_targets(teacher, x)
        loss = train_step(model, optimizer, x, labels[idx], w, use_bf16, cfg.label_smoothing, cfg.grad_clip,
                          soft, cfg.distill_weight, cfg.distill_temperature)  # fmt: skip
        if loss is None:
            raise FloatingPointError(f"loss is not finite at step {step}; lower the learning rate")
        step += 1

        now = time.perf_counter()
        elapsed += now - t_last
        img_s = len(idx) / max(now - t_last, 1e-9)
        t_last = now
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss_ema:.3f}", img_s=f"{img_s:.0f}", lr=f"{lr:.2e}")
        bar.update()
        record: dict[str, Any] = {"step": step, "losses/joint": loss.item(), "charts/lr": lr, "charts/img_per_s": img_s}
        if step % steps_per_epoch == 0 and monitor is not None:
            record.update(_monitor(model, *monitor))
            model.train()
            bar.write(f"epoch {step // steps_per_epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items()))
        if step % 20 == 0 or step == total_steps or len(record) > 4:
            log_file.write(json.dumps({**record, "wall_s": round(elapsed, 1)}) + "\n")
            log_file.flush()
            if run is not None:
                run.log(record, step=step)
        if step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == total_steps:
            _save_state(out / "train_state.pt", model, optimizer, cfg, step, elapsed)
    bar.close()
    log_file.close()

    info = {
        "train_config": dataclasses.asdict(cfg),
        "steps": step,
        "train_wall_s": round(elapsed, 1),
        "teacher_wall_s": round(teacher_wall_s, 1),
        "total_wall_s": round(elapsed + teacher_wall_s, 1),
        "precision": "bf16" if use_bf16 else "fp32",
        "classes": data.classes,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    sha = save_backbone(model, out / "backbone.safetensors", metadata=info)
    if run is not None:
        run.finish()
    return {
        "backbone": str(out / "backbone.safetensors"),
        "sha256": sha,
        "steps": step,
        "wall_s": elapsed,
        "teacher_wall_s": teacher_wall_s,
        "final_loss": loss_ema,
    }


def _load_training_data(cfg: TrainConfig, model: AdaPerceiver) -> ImageDataset:
    """The named Fashion-MNIST split, or ``cfg.image_folder`` read at the model's input size and channels."""
    if cfg.image_folder is None:
        return load_split(cfg.split, cfg.data_dir)
    c = model.cfg
    data = load_image_folder(cfg.image_folder, c.img_size, c.in_chans)
    if len(data.classes) != c.num_classes:
        raise ValueError(
            f"{cfg.image_folder} has {len(data.classes)} classes but {cfg.model} has {c.num_classes} outputs; "
            f"add model_overrides.num_classes={len(data.classes)}"
        )
    return data


def sample_widths(widths: torch.Tensor, n: int) -> torch.Tensor:
    """One FFN width per sample, drawn uniformly from ``widths`` with torch's global RNG.

    Sorted, so each width's samples form one contiguous group for the MLP (no gather/scatter); the batch order is
    random anyway, so which sample gets which width stays random.
    """
    return widths[torch.randint(len(widths), (n,))].sort().values


def train_step(
    model: AdaPerceiver,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    widths: torch.Tensor | None,
    bf16: bool,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 0.0,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """One optimizer step on the joint loss of a batch; returns the loss, or None (no update) if it is not finite.

    ``widths`` (one per sample) trains every setting; ``None`` trains the largest setting alone (plain cross-entropy
    of ``model(x)``, the reference that shows what sharing the weights across settings costs).

    Shared by the training loop and ``benchmarks/bench_train_step.py``, so the benchmark times the real step.
    """
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model.forward_all(x, width=widths) if widths is not None else model(x)[:, None, None]
    loss = joint_loss(logits, labels, label_smoothing, teacher_logits, distill_weight, temperature)
    if not torch.isfinite(loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss


def _teacher(cfg: TrainConfig, model: AdaPerceiver, data: ImageDataset, out: Path, resume: str | None):
    """The distillation teacher, saved as ``out/teacher.safetensors``: the one next to ``resume``'s state file
    when resuming (so a resumed run does not retrain it), else trained on the training data now.
    Returns it and the seconds its training took."""
    path = out / TEACHER_FILE
    saved = Path(resume).parent / TEACHER_FILE if resume else None
    if saved is not None and saved.is_file():
        teacher, wall_s = load_teacher(model.cfg, saved)
        if saved.resolve() == path.resolve():
            return teacher, wall_s
    else:
        teacher, wall_s = train_teacher(model.cfg, data, cfg.teacher_epochs, seed=cfg.seed)
    save_teacher(teacher, path, wall_s)
    return teacher, wall_s


def native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here. Elsewhere bf16 autocast is emulated: measured about 12x slower
    than fp32 on an AVX2-only CPU, so ``bf16: true`` then falls back to fp32 instead of crawling."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op; absent in some builds -> assume not native
        return False


@torch.no_grad()
def _monitor(model: AdaPerceiver, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of the full and the smallest setting (progress signal, not used for selection)."""
    acc = accuracy_grid(model, images, labels, batch_size=500, widths=[model.cfg.widths[0], model.cfg.widths[-1]])
    return {"monitor/acc_full": acc[-1, -1, -1].item(), "monitor/acc_smallest": acc[0, 0, 0].item()}


def _save_state(path: Path, model, optimizer, cfg: TrainConfig, step: int, elapsed: float) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "train_config": dataclasses.asdict(cfg),
        "model_config": model.cfg.to_dict(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_state(path: str, model, optimizer, cfg: TrainConfig) -> tuple[int, float]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--resume file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("model_config") != model.cfg.to_dict():
        raise ValueError(f"{path} was saved for a different model config; cannot resume with this one")
    saved, now = state.get("train_config", {}), dataclasses.asdict(cfg)
    changed = sorted(k for k in _SCHEDULE_KEYS if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"{path} was trained with different {changed}: {[saved.get(k) for k in changed]}; "
            "resuming would follow another schedule"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), float(state.get("elapsed", 0.0))


def _init_wandb(cfg: TrainConfig, out: Path):
    if cfg.wandb == "disabled":
        return None
    if cfg.wandb not in ("offline", "online"):
        raise ValueError(f"wandb must be disabled, offline or online, got {cfg.wandb!r}")
    import wandb

    return wandb.init(project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg), dir=str(out))


def build_config(config_path: str | None, overrides: list[str], **cli: Any) -> TrainConfig:
    values = load_yaml(config_path) if config_path else {}
    values = merge(values, parse_overrides(overrides))
    values = merge(values, {k: v for k, v in cli.items() if v is not None})
    return build_dataclass(TrainConfig, values, source=config_path or "options")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the option list in the epilog kept one per line."""


def _options_help() -> str:
    """Every TrainConfig option with its default and the comment beside it in the source (for ``--help``)."""
    lines = ["key=value options (TrainConfig; nested ones as model_overrides.FIELD=VALUE):"]
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= (.+?)\s+# (.+)", line)
        if m:
            name, default, comment = m.groups()
            default = default.replace("field(default_factory=dict)", "{}").strip('"')
            lines.append(f"  {name}={default}: {comment}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backbone.train",
        description=__doc__.split("\n\n")[0],
        epilog=_options_help(),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", default="configs/backbone_fmnist.yaml", help="YAML file of TrainConfig options")
    parser.add_argument("overrides", nargs="*", help="TrainConfig options as key=value (e.g. epochs=2 lr=1e-3)")
    parser.add_argument("--resume", help="train_state.pt of an interrupted run to continue from")
    parser.add_argument("--out", help="run folder (overrides the config's `out`)")
    parser.add_argument("--data-dir", help="Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)")
    parser.add_argument(
        "--image-folder",
        help="train on your own ROOT/<class>/<image> tree instead of Fashion-MNIST (resized to the model's "
        "img_size; set model_overrides.num_classes / in_chans / mean / std to match)",
    )
    parser.add_argument("--wandb", choices=["disabled", "offline", "online"], help="Weights & Biases logging mode")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = build_config(args.config, args.overrides, out=args.out, data_dir=args.data_dir, wandb=args.wandb,
                           image_folder=args.image_folder)  # fmt: skip
        summary = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
