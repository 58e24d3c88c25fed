"""``--data``: a built-in task name (``fmnist``) or an image-folder root, resolved to the task's three splits.

An image-folder task is ``ROOT/<split>/<class>/<image>``:

* ``ROOT/train/`` (required for backbone training): the backbone learns here. Without ``ROOT/policy-train/`` the
  backbone's training holds out a deterministic, class-stratified part of it (``backbone/holdout.py``) as the
  policy split and records which files in the checkpoint; the policy side then uses exactly those files.
* ``ROOT/policy-train/`` (optional): an explicit policy split (e.g. half of ImageNet's ``val/`` when the backbone is
  the release); it must share no image with the backbone's recorded training images.
* ``ROOT/test/``: reported numbers only.

Every split must have the same class folders; the backbone must output that many classes, and a backbone that
records its class names must record these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backbone.data import FASHION_MNIST_CLASSES, SPLITS, DataError, ImageDataset, load_split
from backbone.folder_split import FolderSplit
from backbone.holdout import RULE, stratified_holdout
from backbone.model import AdaPerceiver

BUILTIN_TASKS = ("fmnist",)
TRAIN_FOLDER, POLICY_FOLDER, TEST_FOLDER = "train", "policy-train", "test"


def resolve_data(data: str | os.PathLike | None, data_dir: str | os.PathLike | None = None) -> DataSource:
    """``None`` or ``"fmnist"`` -> Fashion-MNIST (from ``data_dir``); an existing folder -> an image-folder task."""
    if data is None or str(data) in BUILTIN_TASKS:
        return FashionMNIST(data_dir)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {data}: neither a built-in task ({', '.join(BUILTIN_TASKS)}) nor an existing folder")
    return ImageFolderTask(root)


def _backbone_name(model: AdaPerceiver) -> str:
    return str(getattr(model, "checkpoint_path", None) or model.cfg.name)


def _check_classes(model: AdaPerceiver, classes: list[str], what: str) -> None:
    """The backbone outputs ``len(classes)`` classes and, if it records class names, exactly these."""
    recorded = (getattr(model, "checkpoint_info", None) or {}).get("classes")
    if recorded and list(recorded) != list(classes):
        raise DataError(
            f"backbone {_backbone_name(model)} was trained on classes {_short(recorded)}, but {what} has "
            f"{_short(classes)}; use a backbone trained on this data"
        )
    if model.cfg.num_classes != len(classes):
        raise DataError(
            f"{what} has {len(classes)} classes but backbone {_backbone_name(model)} has {model.cfg.num_classes} "
            "outputs"
        )


def _short(names: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(c) for c in list(names)[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"


class DataSource:
    """A task: its name (for run folders) and its splits ``backbone-train``, ``policy-train``, ``test``."""

    name: str
    spec: str | None  # what --data said (None: the default, Fashion-MNIST)
    builtin: bool

    def check_backbone(self, model: AdaPerceiver) -> None:
        """DataError unless ``model`` classifies this task's classes."""
        raise NotImplementedError


class FashionMNIST(DataSource):
    """The built-in task: Fashion-MNIST's IDX files (``--data-dir``), split as :func:`backbone.data.load_split`."""

    name, builtin = "fmnist", True

    def __init__(self, data_dir: str | os.PathLike | None = None) -> None:
        self.data_dir, self.spec = data_dir, None

    def dataset(self, split: str) -> ImageDataset:
        return load_split(split, self.data_dir)

    def check_backbone(self, model: AdaPerceiver) -> None:
        _check_classes(model, FASHION_MNIST_CLASSES, "Fashion-MNIST (--data fmnist)")


class ImageFolderTask(DataSource):
    """``ROOT/{train,policy-train,test}/<class>/<image>``; see the module docstring."""

    builtin = False

    def __init__(self, root: Path) -> None:
        self.root, self.spec = Path(root), str(root)
        self.name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.root.resolve().name) or "data"
        self._open: dict[str, FolderSplit] = {}

    def folder(self, name: str) -> FolderSplit:
        """``ROOT/<name>/`` listed (cached); DataError naming what is missing."""
        if name not in self._open:
            path = self.root / name
            if not path.is_dir():
                have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
                raise DataError(
                    f"{self.root} has no {name}/ folder (it has {have or 'no folders'}); expected "
                    f"ROOT/{TRAIN_FOLDER}/, ROOT/{TEST_FOLDER}/ and optionally ROOT/{POLICY_FOLDER}/"
                )
            split = FolderSplit.open(path, name=f"{self.name}/{name}")
            self._open[name] = split
        return self._open[name]

    @property
    def classes(self) -> list[str]:
        """Class names: those of ``train/`` if present, else of ``test/``."""
        return self.folder(TRAIN_FOLDER if (self.root / TRAIN_FOLDER).is_dir() else TEST_FOLDER).classes

    def _same_classes(self, split: FolderSplit, reference: list[str]) -> None:
        missing, extra = sorted(set(reference) - set(split.classes)), sorted(set(split.classes) - set(reference))
        if missing:
            raise DataError(f"class {missing[0]!r} is missing from {split.folder} (it is in the other splits)")
        if extra:
            raise DataError(f"{split.folder} has class {extra[0]!r} that the other splits do not have")

    def check_backbone(self, model: AdaPerceiver) -> None:
        _check_classes(model, self.classes, f"--data {self.root}")

    # --- backbone side ------------------------------------------------------------------------------------------
    def backbone_train(self, model: AdaPerceiver, policy_fraction: float) -> tuple[FolderSplit, dict[str, Any]]:
        """The files the backbone trains on and the record its checkpoint keeps (``info["data"]``)."""
        train = self.folder(TRAIN_FOLDER)
        if model.cfg.num_classes != len(train.classes):
            raise DataError(
                f"{train.folder} has {len(train.classes)} classes but {model.cfg.name} has {model.cfg.num_classes} "
                f"outputs; add model_overrides.num_classes={len(train.classes)}"
            )
        for name in (POLICY_FOLDER, TEST_FOLDER):
            if (self.root / name).is_dir():
                self._same_classes(self.folder(name), train.classes)
        record: dict[str, Any] = {"root": str(self.root.resolve()), "classes": train.classes}
        if (self.root / POLICY_FOLDER).is_dir():
            record["policy_split"] = POLICY_FOLDER
            part = train
        else:
            held = stratified_holdout(train.samples, policy_fraction)
            held_set = set(held)
            record["policy_split"] = {
                "holdout_of": TRAIN_FOLDER,
                "fraction": policy_fraction,
                "rule": RULE,
                "files": held,
            }
            part = train.restricted(lambda r: r not in held_set, f"{self.name}/backbone-train")
        return part.preprocessed_for(model.cfg), record

    # --- policy side --------------------------------------------------------------------------------------------
    def split(self, split: str, model: AdaPerceiver, check_overlap: bool = True) -> FolderSplit:
        """Split ``split`` read with ``model``'s preprocessing, checked against the backbone's record.

        ``policy-train`` is ``ROOT/policy-train/`` if it exists, else exactly the hold-out of ``train/`` that the
        backbone's checkpoint records. DataError if a class is missing, the class names differ from the backbone's,
        the policy split shares images with the backbone's training images, or there is no policy split.
        """
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.check_backbone(model)
        record = (getattr(model, "checkpoint_info", None) or {}).get("data") or {}
        holdout = record.get("policy_split")
        if split == "backbone-train":
            held = set(holdout["files"]) if isinstance(holdout, dict) else set()
            part = self.folder(TRAIN_FOLDER).restricted(lambda r: r not in held, f"{self.name}/backbone-train")
        elif split == "test" or (self.root / POLICY_FOLDER).is_dir():
            part = self.folder(TEST_FOLDER if split == "test" else POLICY_FOLDER)
            self._same_classes(part, self.classes)
            if check_overlap and record.get("train_sha256"):
                self._check_disjoint(part, record)
        else:
            if not isinstance(holdout, dict):
                why = (
                    "its checkpoint records no hold-out of train/"
                    if not record
                    else "it trained on all of train/ (the data had a policy-train/ folder then)"
                )
                raise DataError(
                    f"no policy split for backbone {_backbone_name(model)} in {self.root}: {why}; add "
                    f"{self.root / POLICY_FOLDER}/ with images the backbone never saw"
                )
            train = self.folder(TRAIN_FOLDER)
            held = set(holdout["files"])
            missing = sorted(held - {r for r, _ in train.samples})
            if missing:
                raise DataError(
                    f"{len(missing)} held-out file(s) recorded in the backbone are missing from "
                    f"{train.folder} (e.g. {missing[0]}); the data changed since the backbone trained"
                )
            part = train.restricted(held.__contains__, f"{self.name}/policy-train")
        return part.preprocessed_for(model.cfg)

    def _check_disjoint(self, part: FolderSplit, record: dict[str, Any]) -> None:
        trained = set(record["train_sha256"])
        for i, h in enumerate(part.file_hashes(progress=False)):
            if h in trained:
                raise DataError(
                    f"{part.path(i)} is one of the backbone's training images: {part.folder} must share no image "
                    "with the images the backbone trained on"
                )
