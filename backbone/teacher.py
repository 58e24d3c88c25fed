"""A small CNN teacher for knowledge distillation into the AdaPerceiver (training only, never at inference).

Why: the AdaPerceiver reads the patches once through input-independent queries, which generalises poorly from
50k small images (the shipped checkpoint scores 94% on its own training images and 89% on test). The paper
trains its backbones by distillation from a stronger teacher; no pretrained teacher can be downloaded here, so
``backbone.train`` first trains this two-layer CNN (translation-equivariant, about 92% held-out on Fashion-MNIST
after 8 epochs, about 7 minutes on 2 cores) and then adds a KL term towards its softened predictions to every
(granularity, depth) loss of the joint objective. The teacher's training time counts in the run's wall time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from backbone.checkpoint import atomic_write
from backbone.config import AdaPerceiverConfig
from backbone.data import ImageDataset


class ConvTeacher(nn.Module):
    """Two conv-BN-ReLU-pool stages and an MLP head; takes the student's [0, 1] images and normalises them itself."""

    def __init__(self, cfg: AdaPerceiverConfig, channels: tuple[int, int] = (32, 64), hidden: int = 128) -> None:
        super().__init__()
        if cfg.img_size % 4:
            raise ValueError(f"the teacher needs an image size divisible by 4, got {cfg.img_size}")
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_chans, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = cfg.img_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(hidden, cfg.num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - self.mean) / self.std))


def train_teacher(
    cfg: AdaPerceiverConfig,
    data: ImageDataset,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> tuple[ConvTeacher, float]:
    """Train a :class:`ConvTeacher` on ``data`` (random horizontal flips, AdamW, one-cycle LR); returns it in eval
    mode and the wall seconds it took. Seeded by ``seed`` alone, so a rerun gives the same teacher."""
    if epochs < 1:
        raise ValueError(f"teacher_epochs must be >= 1 to distill, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        teacher = ConvTeacher(cfg)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    t0 = time.perf_counter()
    teacher.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="teacher", unit="step", dynamic_ncols=True)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), batch_size):
            idx = perm[i : i + batch_size]
            x = data.images[idx].float() / 255.0
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.random.fork_rng():  # dropout draws from a seeded stream, leaving the caller's RNG alone
                torch.manual_seed(seed * 1_000_003 + bar.n)
                loss = F.cross_entropy(teacher(x), data.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    return teacher.eval(), time.perf_counter() - t0


def save_teacher(teacher: ConvTeacher, path: str | Path, wall_s: float) -> None:
    """Atomically write the teacher's weights (safetensors) with its training time in the metadata."""
    atomic_write(path, lambda tmp: save_file(teacher.state_dict(), str(tmp), metadata={"wall_s": f"{wall_s:.1f}"}))


def load_teacher(cfg: AdaPerceiverConfig, path: str | Path) -> tuple[ConvTeacher, float]:
    """A teacher saved by :func:`save_teacher` for a student of config ``cfg``, in eval mode, and its wall seconds."""
    teacher = ConvTeacher(cfg)
    try:
        with safe_open(str(path), "pt") as f:  # one read: tensors and metadata
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            wall_s = float((f.metadata() or {}).get("wall_s", 0.0))
        teacher.load_state_dict(state)
    except (RuntimeError, OSError) as e:  # shape mismatch, truncated file
        raise ValueError(f"{path} is not a teacher for this model ({e.__class__.__name__}: {e})") from None
    return teacher.eval(), wall_s


def distill_targets(teacher: ConvTeacher, x: torch.Tensor) -> torch.Tensor:
    """Teacher logits for a batch, without gradients (the teacher is frozen while the student trains)."""
    with torch.no_grad():
        return teacher(x)
