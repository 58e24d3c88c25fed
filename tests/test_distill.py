"""Tests for distillation from the CNN teacher (backbone.teacher and the distillation term of backbone.train).

The loss mix is checked against a direct computation; the teacher trains deterministically, learns, and round-trips
through its file; a distilled run saves its teacher and a resumed run reuses it instead of retraining.
Synthetic data and the tiny ``adaperceiver_test`` size, one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import backbone.train as train_mod
from backbone import create_model
from backbone.data import ImageDataset
from backbone.teacher import ConvTeacher, distill_targets, load_teacher, save_teacher, train_teacher
from backbone.train import TEACHER_FILE, TrainConfig, joint_loss, train

N_IMAGES, BATCH = 256, 64


@pytest.fixture(scope="module")
def data(square_images) -> ImageDataset:
    """N_IMAGES noise images whose class is a bright square's position (conftest.square_images)."""
    return square_images(N_IMAGES, seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(out: Path, **overrides) -> TrainConfig:
    values = dict(model="adaperceiver_test", epochs=1, batch_size=BATCH, num_threads=1, monitor_samples=0,
                  checkpoint_every=1000, out=str(out), distill_weight=0.5, teacher_epochs=1)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


# --- the loss ------------------------------------------------------------------------------------------------------


def test_distillation_loss_matches_direct_computation() -> None:
    torch.manual_seed(0)
    b, k, depth, c = 5, 2, 3, 4
    logits, teacher = torch.randn(b, k, depth, c), torch.randn(b, c)
    labels = torch.randint(0, c, (b,))
    a, t = 0.7, 2.0
    weights = torch.tensor([1.0, 2.0, 3.0]) / 6.0
    want = torch.zeros(())
    for kk in range(k):
        for d in range(depth):
            s = logits[:, kk, d]
            ce = F.cross_entropy(s, labels)
            p = F.softmax(teacher / t, -1)
            kl = (p * (p.log() - F.log_softmax(s / t, -1))).sum(-1).mean()
            want = want + weights[d] * ((1 - a) * ce + a * t * t * kl) / k
    got = joint_loss(logits, labels, teacher_logits=teacher, distill_weight=a, temperature=t)
    torch.testing.assert_close(got, want)


def test_distillation_off_is_plain_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels, teacher = torch.randn(4, 2, 3, 5), torch.randint(0, 5, (4,)), torch.randn(4, 5)
    plain = joint_loss(logits, labels)
    assert torch.equal(joint_loss(logits, labels, teacher_logits=teacher, distill_weight=0.0), plain)
    # a student that already matches the teacher pays only the (1 - a) share of the cross-entropy
    same = teacher[:, None, None, :].expand(4, 2, 3, 5)
    torch.testing.assert_close(
        joint_loss(same, labels, teacher_logits=teacher, distill_weight=0.3), 0.7 * joint_loss(same, labels)
    )


# --- the teacher ---------------------------------------------------------------------------------------------------


def test_teacher_learns_is_deterministic_and_round_trips(data: ImageDataset, tmp_path: Path) -> None:
    cfg = create_model("adaperceiver_test").cfg
    x, y = data.as_float(), data.labels
    untrained = ConvTeacher(cfg).eval()
    teacher, wall_s = train_teacher(cfg, data, epochs=3, batch_size=32, seed=0)
    assert not teacher.training and wall_s > 0
    acc_before = (distill_targets(untrained, x).argmax(-1) == y).float().mean().item()
    acc_after = (distill_targets(teacher, x).argmax(-1) == y).float().mean().item()
    assert acc_after > max(0.5, acc_before + 0.2), f"teacher accuracy {acc_before:.2f} -> {acc_after:.2f}"

    again, _ = train_teacher(cfg, data, epochs=3, batch_size=32, seed=0)
    for (name, p), q in zip(teacher.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs between two teachers trained with the same seed"

    path = tmp_path / "teacher.safetensors"
    save_teacher(teacher, path, wall_s)
    loaded, loaded_wall_s = load_teacher(cfg, path)
    assert loaded_wall_s == pytest.approx(wall_s, abs=0.1)
    assert torch.equal(distill_targets(loaded, x), distill_targets(teacher, x))

    other = create_model("adaperceiver_test", num_classes=3).cfg
    with pytest.raises(ValueError, match="is not a teacher for this model"):
        load_teacher(other, path)
    with pytest.raises(ValueError, match="teacher_epochs must be >= 1"):
        train_teacher(cfg, data, epochs=0)


# --- a distilled run -----------------------------------------------------------------------------------------------


def test_distilled_run_saves_its_teacher_and_resume_reuses_it(data: ImageDataset, tmp_path: Path, monkeypatch) -> None:
    first = tmp_path / "first"
    summary = train(_config(first, epochs=2), data=data)
    assert (first / TEACHER_FILE).is_file() and summary["teacher_wall_s"] > 0
    plain = train(_config(tmp_path / "plain", epochs=2, distill_weight=0.0), data=data)
    assert plain["teacher_wall_s"] == 0.0 and not (tmp_path / "plain" / TEACHER_FILE).exists()
    assert summary["final_loss"] != plain["final_loss"], "the distillation term must change the objective"

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run must reuse the saved teacher, not train a new one")

    monkeypatch.setattr(train_mod, "train_teacher", no_training)
    resumed = train(_config(tmp_path / "resumed", epochs=2), resume=str(first / "train_state.pt"), data=data)
    assert resumed["steps"] == summary["steps"]
    assert (tmp_path / "resumed" / TEACHER_FILE).read_bytes() == (first / TEACHER_FILE).read_bytes()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("distill_weight", 1.0, r"distill_weight must be in \[0, 1\)"),
    ("distill_weight", -0.1, r"distill_weight must be in \[0, 1\)"),
    ("distill_temperature", 0.0, r"distill_temperature must be > 0"),
])  # fmt: skip
def test_bad_distillation_options_are_refused(data: ImageDataset, tmp_path: Path, key, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        train(_config(tmp_path / "bad", **{key: value}), data=data)


def test_distillation_with_augmentation_scores_the_augmented_batch(data: ImageDataset, tmp_path: Path, monkeypatch):
    """Without augmentation the teacher scores every image once; with it, each step's shifted/flipped batch."""
    calls: list[int] = []

    def counting(teacher, x):
        calls.append(len(x))
        return distill_targets(teacher, x)

    monkeypatch.setattr(train_mod, "distill_targets", counting)
    train(_config(tmp_path / "plain_images"), data=data)
    assert calls == [N_IMAGES]  # one pass over the (small) training set, before the first step
    calls.clear()
    summary = train(_config(tmp_path / "augmented", augment=True), data=data)
    assert calls == [BATCH] * (N_IMAGES // BATCH) and summary["final_loss"] > 0
