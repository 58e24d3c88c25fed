"""Joint (once-for-all) training of an AdaPerceiver backbone (DESIGN §2, "Joint training").

The command line is ``python -m backbone.train`` (``backbone/train.py``); this module is the library behind it.

Every step trains every setting at once: each sample draws an FFN width, the model runs ``N_max`` latents with
the block-causal mask, and the loss is the cross-entropy of the write-out at *every* token granularity and
*every* depth, depth ``l`` weighted by ``l`` (normalised). Deterministic for a given seed on one machine: the
data order of an epoch and all randomness of a step are seeded from (seed, epoch) and (seed, step), so a
resumed run continues exactly where it stopped.

Under ``torchrun`` each process trains on its shard of every global batch (``backbone/data_parallel.py``) and
rank 0 alone writes the run folder; the parameters follow those of one process with the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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

from backbone.checkpoint import save_backbone
from backbone.config import AdaPerceiverConfig
from backbone.data import ImageDataset, load_image_folder, load_split
from backbone.data_parallel import JointForward, my_shard, per_process_batch, wrap_for_ranks
from backbone.data_source import resolve_data
from backbone.distributed import broadcast, is_main, local_device, mean_across_ranks, world_size
from backbone.factory import create_model
from backbone.fileio import atomic_write
from backbone.finetune import init_from_checkpoint
from backbone.model import AdaPerceiver
from backbone.option_checks import check_int, check_number
from backbone.settings_io import dump_yaml
from backbone.sweep import accuracy_grid

WANDB_MODES = ("disabled", "offline", "online")
STATE_FILE = "train_state.pt"
BACKBONE_FILE = "backbone.safetensors"
LOG_FILE = "log.jsonl"


@dataclass
class TrainConfig:
    """Options of a joint-training run; the defaults are the issue-3 recipe (``configs/backbone_fmnist.yaml``, the
    previous default). The shipped default trains with ``configs/backbone_fmnist_stages.yaml``, which
    ``python -m backbone.train`` reads unless given another ``--config``."""

    model: str = "adaperceiver_fmnist"  # named size (backbone.MODEL_NAMES)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # AdaPerceiverConfig fields to change
    init: str = ""  # fine-tune: start from this backbone checkpoint (its architecture; only num_classes may change)
    split: str = "backbone-train"  # training split (train[:50000]); the policy split is never trained on
    image_folder: str | None = None  # train on a flat root/<class>/<image> tree instead of `split` (no recipe below)
    data: str | None = None  # task: None/fmnist (Fashion-MNIST `split`) or an image-folder root ROOT/<split>/<class>/
    policy_fraction: float = 0.1  # image folder without policy-train/: share of each class of train/ held out for it
    min_steps: int = 1500  # image folder: at least this many optimiser steps (more epochs on small data)
    small_data: int = 20000  # image folder: random shift + flip when train/ has fewer images than this (0 = never)
    workers: int = 2  # image folder: DataLoader worker processes decoding images
    epochs: int = 12  # passes over the split
    batch_size: int = 256  # images per step (the global batch: split evenly over torchrun's processes)
    lr: float = 2e-3  # peak AdamW learning rate, reached after warm-up
    min_lr: float = 1e-5  # final learning rate of the cosine schedule
    warmup_epochs: float = 1.0  # linear warm-up length
    weight_decay: float = 0.05  # AdamW decay (not on norms, biases, LayerScale, embeddings: timm's convention)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    distill_weight: float = 0.5  # with stem exits: KL share of the shallow stages' loss (in-place distillation)
    augment: bool = False  # random shift by up to 2 px + horizontal flip (slows fitting; off by default)
    bf16: bool = False  # bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), else fp32 anyway
    seed: int = 0  # seeds model init, data order, widths and augmentation
    num_threads: int = 0  # torch intra-op threads (0 = torch's default)
    device: str = "cpu"  # torch device; under torchrun "cuda" is each process's own GPU (NCCL), "cpu" uses gloo
    limit_train: int = 0  # train on the first n images only (0 = all); for smoke tests
    monitor_samples: int = 2000  # held-out policy-train images scored at each epoch end (progress only)
    checkpoint_every: int = 200  # steps between atomic training-state checkpoints
    out: str = ""  # run folder ("" = runs/backbone__<model>__s<seed>__<time> in the working directory)
    data_dir: str | None = None  # Fashion-MNIST folder (default: $ADAPERCEIVER_DATA_DIR or Debian's path)
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "adaperceiver-rl"  # Weights & Biases project of the run

    def __post_init__(self) -> None:
        """A value outside its range is a one-line error here, not a failure deep inside a run."""
        for name in ("epochs", "batch_size", "checkpoint_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("min_steps", "small_data", "workers", "num_threads", "limit_train", "monitor_samples", "seed"):
            check_int(name, getattr(self, name), 0)
        for name in ("lr", "min_lr", "warmup_epochs", "weight_decay", "grad_clip"):
            check_number(name, getattr(self, name), 0.0)
        check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_number("distill_weight", self.distill_weight, 0.0, 1.0)
        check_number("policy_fraction", self.policy_fraction, 0.0, 1.0, low_open=True, high_open=True)
        for name in ("augment", "bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {list(WANDB_MODES)}, got {self.wandb!r}")

    def run_name(self) -> str:
        """cleanrl-style ``backbone__{model}__s{seed}__{time}``; a fine-tuning run is named after its checkpoint
        (``backbone__ft-{file stem}__...``), whose architecture it trains whatever ``model`` says."""
        what = f"ft-{Path(self.init).stem}" if self.init else self.model
        return f"backbone__{what}__s{self.seed}__{time.strftime('%Y%m%d-%H%M%S')}"


def joint_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over granularities of the depth-weighted loss ``sum_l l * loss(k, l) / sum_l l``.

    Args:
        logits: ``(B, K, L, C)`` write-outs of every granularity and depth (``AdaPerceiver.forward_all``).
        labels: ``(B,)`` classes.
        label_smoothing: Cross-entropy label smoothing.
        teacher_logits: ``(B, C)`` targets of in-place distillation (the deepest stage's full-setting logits);
            ``loss`` is then ``(1 - a) * CE + a * KL(teacher || student)`` with ``a = distill_weight``.
        distill_weight: ``a`` above (0 = plain cross-entropy).
    """
    b, k, depth, c = logits.shape
    flat = logits.float().reshape(-1, c)
    per = F.cross_entropy(
        flat, labels.repeat_interleave(k * depth), label_smoothing=label_smoothing, reduction="none"
    ).view(b, k, depth)
    if teacher_logits is not None and distill_weight > 0:
        target = F.log_softmax(teacher_logits.float(), dim=-1).repeat_interleave(k * depth, dim=0)
        kl = F.kl_div(F.log_softmax(flat, dim=-1), target, log_target=True, reduction="none").sum(-1)
        per = (1 - distill_weight) * per + distill_weight * kl.view(b, k, depth)
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


# options that shape the optimisation trajectory: a resumed run must use the saved values
_SCHEDULE_KEYS = (
    "model",
    "model_overrides",
    "init",
    "split",
    "image_folder",
    "data",
    "policy_fraction",
    "min_steps",
    "small_data",
    "epochs",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_epochs",
    "weight_decay",
    "label_smoothing",
    "grad_clip",
    "distill_weight",
    "augment",
    "bf16",
    "seed",
    "limit_train",
)


def _step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``saved_step`` is the step of the last atomic training-state checkpoint (0: none)."""

    def __init__(self, out: Path, saved_step: int) -> None:
        super().__init__(f"interrupted at {out}")
        self.out, self.saved_step = out, saved_step


def train(cfg: TrainConfig, resume: str | None = None, data: ImageDataset | None = None) -> dict[str, Any]:
    """Run (or resume) joint training; returns a summary dict. ``data`` replaces the named split (tests).

    ``resume`` is a run folder (or its ``train_state.pt``); the run then continues in that folder.
    Ctrl-C raises :class:`TrainingInterrupted` after the last checkpoint is safely on disk.
    """
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    if not 0.0 <= cfg.distill_weight < 1.0:
        raise ValueError(f"distill_weight must be in [0, 1), got {cfg.distill_weight}")
    rank_batch = per_process_batch(cfg.batch_size)
    state_path = resolve_state(resume) if resume else None
    # one folder for all ranks: the default name holds the time, which the ranks could read a second apart
    out = broadcast(Path(cfg.out) if cfg.out else (state_path.parent if state_path else Path("runs") / cfg.run_name()))
    main = is_main()
    # a fresh run into a folder that holds one (even one killed before its first checkpoint) would append to its
    # log and overwrite its state and backbone
    taken = broadcast(state_path is None and any((out / f).exists() for f in (STATE_FILE, BACKBONE_FILE, LOG_FILE)))
    if taken:
        raise ValueError(f"{out} already holds a training run; continue it with --resume {out} or pick another --out")
    device = local_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    source = resolve_data(cfg.data, cfg.data_dir)
    folder_task = not source.builtin and data is None
    # the held-out monitor scores Fashion-MNIST's policy split: only meaningful when training on its backbone split
    monitored = data is None and cfg.image_folder is None and cfg.split == "backbone-train" and source.builtin
    data_record = None
    if folder_task:
        data, data_record = _load_folder_task(cfg, model, source)
    elif data is None:
        data = _load_training_data(cfg, model)
    if cfg.limit_train:
        data = data.subset(cfg.limit_train)
    n = len(data)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {n} training images")
    epochs, augment = cfg.epochs, cfg.augment
    if folder_task:  # the small-data recipe: enough optimiser steps, and augmentation on small sets
        epochs = max(epochs, math.ceil(cfg.min_steps / steps_per_epoch))
        augment = augment or n < cfg.small_data
    if folder_task and main:
        print(f"{source.root}: {n} training images, {epochs} epochs of {steps_per_epoch} steps"
              f"{', augmented' if augment else ''} (min_steps={cfg.min_steps}, small_data={cfg.small_data})",
              file=sys.stderr)  # fmt: skip
    total_steps = steps_per_epoch * epochs

    model.to(device)
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
    if state_path:
        step, elapsed = _load_state(state_path, model, optimizer, cfg)
        if main:  # what a kill cost: the steps after this one are redone
            print(f"resuming {out} at step {step} of {total_steps}", file=sys.stderr)
    net = wrap_for_ranks(model)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml({**dataclasses.asdict(cfg), "world_size": world_size(), "per_process_batch": rank_batch},
                  out / "config.yaml")  # fmt: skip

    monitor = None
    if cfg.monitor_samples and monitored and main:
        held_out = load_split("policy-train", cfg.data_dir).subset(cfg.monitor_samples)
        monitor = (held_out.as_float(), held_out.labels)

    use_bf16 = cfg.bf16 and (device.type == "cuda" or native_bf16())
    if cfg.bf16 and not use_bf16 and main:
        print("note: this CPU has no native bf16 (AVX512-BF16/AMX); training in fp32", file=sys.stderr)
    run = _init_wandb(cfg, out) if main else None
    images, labels = data.images, data.labels
    widths = torch.tensor(model.cfg.widths)
    saved_step = step
    bar = tqdm(total=total_steps, initial=step, desc="joint training", unit="step", dynamic_ncols=True,
               disable=not main)  # fmt: skip
    t_last, loss_ema = time.perf_counter(), None
    model.train()
    with (out / LOG_FILE).open("a") if main else open(os.devnull, "w") as log_file:
        try:
            while step < total_steps:
                epoch, i = divmod(step, steps_per_epoch)
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, -1 - epoch)))
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                torch.manual_seed(_step_seed(cfg.seed, step))  # all randomness of this step
                x = images[idx]
                x = (random_shift_flip(x) if augment else x).float() / 255.0
                w = sample_widths(widths, len(idx))
                stages = sample_stages(model.cfg.stages, len(idx))
                # drawn for the global batch on every rank, then this rank's rows (backbone/data_parallel.py)
                x, y, w, stages = (_to(my_shard(t), device) for t in (x, labels[idx], w, stages))
                scheduler.step_update(num_updates=step)
                loss = train_step(net, optimizer, x, y, w, use_bf16, cfg.label_smoothing, cfg.grad_clip, stages,
                                  cfg.distill_weight)  # fmt: skip
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
                record: dict[str, Any] = {"step": step, "losses/joint": loss.item(), "charts/lr": lr,
                                          "charts/img_per_s": img_s}  # fmt: skip
                if step % steps_per_epoch == 0 and monitor is not None:
                    record.update(_monitor(model, *(t.to(device) for t in monitor)))
                    model.train()
                    summary = ", ".join(f"{k}={v:.4f}" for k, v in record.items())
                    bar.write(f"epoch {step // steps_per_epoch}: {summary}")
                if step % 20 == 0 or step == total_steps or len(record) > 4:
                    log_file.write(json.dumps({**record, "wall_s": round(elapsed, 1)}) + "\n")
                    log_file.flush()
                    if run is not None:
                        run.log(record, step=step)
                if main and (step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == total_steps):
                    _save_state(out / STATE_FILE, model, optimizer, cfg, step, elapsed)
                    saved_step = step
        except KeyboardInterrupt:
            bar.close()
            raise TrainingInterrupted(out, saved_step) from None
    bar.close()

    info = {
        "train_config": dataclasses.asdict(cfg),
        "steps": step,
        "train_wall_s": round(elapsed, 1),
        "precision": "bf16" if use_bf16 else "fp32",
        "classes": data.classes,
        **({"init_sha256": model.init_checkpoint_sha256} if cfg.init else {}),
        **({"data": data_record, "epochs": epochs, "augment": augment} if data_record else {}),
        "torch": torch.__version__,
        "command": " ".join(["python -m backbone.train", *sys.argv[1:]]),
    }
    sha = save_backbone(model, out / BACKBONE_FILE, metadata=info) if main else None
    if run is not None:
        run.finish()
    return {"backbone": str(out / BACKBONE_FILE), "sha256": sha, "steps": step, "wall_s": elapsed,
            "final_loss": loss_ema}  # fmt: skip


def build_model(cfg: TrainConfig) -> AdaPerceiver:
    """The model a run starts from: a fresh ``cfg.model`` (with ``model_overrides``), or with ``cfg.init`` that
    checkpoint's weights and architecture (``backbone/finetune.py``)."""
    if not cfg.init:
        return create_model(cfg.model, **cfg.model_overrides)
    model = init_from_checkpoint(cfg.init, cfg.model_overrides)
    if model.cfg.name != cfg.model and is_main():
        print(f"fine-tuning {cfg.init}: its architecture ({model.cfg.name}) is used, not model={cfg.model}",
              file=sys.stderr)  # fmt: skip
    return model


def resolve_state(resume: str | Path) -> Path:
    """A run folder or its ``train_state.pt`` -> the state file; FileNotFoundError naming what is missing."""
    path = Path(resume)
    state = path / STATE_FILE if path.is_dir() else path
    if not state.is_file():
        raise FileNotFoundError(f"--resume: no {STATE_FILE} at {state} (give a run folder of backbone.train)")
    return state


def _load_training_data(cfg: TrainConfig, model: AdaPerceiver) -> ImageDataset:
    """The named Fashion-MNIST split, or ``cfg.image_folder`` read at the model's input size and channels."""
    if cfg.image_folder is None:
        return load_split(cfg.split, cfg.data_dir)
    c = model.cfg
    data = load_image_folder(cfg.image_folder, c.img_size, c.in_chans)
    if len(data.classes) != c.num_classes:
        raise ValueError(
            f"{cfg.image_folder} has {len(data.classes)} classes but {c.name} has {c.num_classes} outputs; "
            f"add model_overrides.num_classes={len(data.classes)}"
        )
    return data


def _load_folder_task(cfg: TrainConfig, model: AdaPerceiver, source) -> tuple[ImageDataset, dict[str, Any]]:
    """``train/`` less the policy hold-out, read at the model's preprocessing, and the checkpoint's data record
    (classes, hold-out files, sha256[:16] of every training image for the policy side's overlap check)."""
    part, record = source.backbone_train(model, cfg.policy_fraction)
    data, hashes = part.read_all(workers=cfg.workers)
    return data, {**record, "train_images": len(hashes), "train_sha256": hashes}


def sample_widths(widths: torch.Tensor, n: int) -> torch.Tensor:
    """One FFN width per sample, drawn uniformly from ``widths`` with torch's global RNG.

    Sorted, so each width's samples form one contiguous group for the MLP (no gather/scatter); the batch order is
    random anyway, so which sample gets which width stays random.
    """
    return widths[torch.randint(len(widths), (n,))].sort().values


def sample_stages(stages: tuple[int, ...], n: int) -> torch.Tensor | None:
    """One input stage below the deepest per sample, uniformly (the sandwich rule's shallow pass), with torch's
    global RNG; None without stem exits (then no random number is drawn, so such runs are as before)."""
    shallow = torch.tensor(stages[:-1], dtype=torch.long)
    return shallow[torch.randint(len(shallow), (n,))] if len(shallow) else None


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def train_step(
    model: AdaPerceiver | torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    labels: torch.Tensor,
    widths: torch.Tensor,
    bf16: bool,
    label_smoothing: float = 0.0,
    grad_clip: float = 0.0,
    stages: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> torch.Tensor | None:
    """One optimizer step on the joint loss of a batch (``widths``: one per sample); returns the loss, or None (no
    update) if it is not finite. Shared by the training loop and ``benchmarks/bench_train_step.py``.

    ``model`` is the backbone, or its :func:`~backbone.data_parallel.wrap_for_ranks` module: then ``x`` is this
    rank's shard, and the loss returned (and checked) is the mean over the ranks, i.e. of the global batch.

    With stem exits, ``stages`` (one shallower input stage per sample) adds the sandwich rule of universally
    slimmable networks / OFA: every image is trained at the deepest stage *and* at its shallow stage, whose loss
    distils in place from the deepest stage's full-depth, full-token logits (``distill_weight``).
    """
    net = JointForward(model) if isinstance(model, AdaPerceiver) else model
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        deep, shallow = net(x, widths, stages)
    loss = joint_loss(deep, labels, label_smoothing)
    if shallow is not None:
        loss = loss + joint_loss(shallow, labels, label_smoothing, deep[:, -1, -1].detach(), distill_weight)
    global_loss = mean_across_ranks(loss)  # every rank takes the same decision below
    if not torch.isfinite(global_loss):
        return None
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return global_loss


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
    return {"monitor/acc_full": float(acc[(-1,) * acc.ndim]), "monitor/acc_smallest": float(acc[(0,) * acc.ndim])}


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


def _load_state(path: Path, model, optimizer, cfg: TrainConfig) -> tuple[int, float]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    try:
        saved_model = AdaPerceiverConfig.from_dict(state.get("model_config", {}))
    except (TypeError, ValueError):
        saved_model = None
    if saved_model != model.cfg:
        raise ValueError(f"{path} was saved for a different model config; cannot resume with this one")
    saved, now, defaults = state.get("train_config", {}), dataclasses.asdict(cfg), dataclasses.asdict(TrainConfig())
    changed = sorted(k for k in _SCHEDULE_KEYS if saved.get(k, defaults[k]) != now.get(k))
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
    import wandb

    return wandb.init(project=cfg.wandb_project, mode=cfg.wandb, config=dataclasses.asdict(cfg), dir=str(out))
