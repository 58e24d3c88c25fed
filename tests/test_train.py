"""Tests for backbone.train: the joint loss learns, a run writes its outputs, runs are deterministic and resumable,
the augmentation only moves pixels, and the command line behaves.

All runs use the tiny ``adaperceiver_test`` size on 512 synthetic images (8 steps of 64 per epoch, one thread).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image
from timm.optim import create_optimizer_v2

import backbone.training as train_mod
from backbone import AdaPerceiver, create_model, file_sha256, load_backbone
from backbone.data import ImageDataset
from backbone.training import TrainConfig, joint_loss, random_shift_flip, train

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, BATCH = 512, 64
STEPS_PER_EPOCH = N_IMAGES // BATCH


@pytest.fixture(scope="module")
def data(square_images) -> ImageDataset:
    """N_IMAGES noise images whose class is a bright square's position (conftest.square_images)."""
    return square_images(N_IMAGES, seed=0)


def _config(out: Path, **overrides) -> TrainConfig:
    values = dict(model="adaperceiver_test", epochs=1, batch_size=BATCH, num_threads=1, monitor_samples=0,
                  checkpoint_every=1000, out=str(out))  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "backbone.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs between {a.name} and {b.name}"


# --- the objective -------------------------------------------------------------------------------------------------


def test_optimizer_steps_lower_joint_loss_on_a_fixed_batch(data: ImageDataset) -> None:
    torch.manual_seed(0)
    model = create_model("adaperceiver_test").train()
    optimizer = create_optimizer_v2(model, "adamw", lr=2e-3, weight_decay=0.05)
    x, y = data.as_float()[:BATCH], data.labels[:BATCH]
    widths = torch.tensor(model.cfg.widths).repeat(BATCH)[:BATCH]  # every width in the batch

    def loss_now() -> float:
        with torch.no_grad():
            return joint_loss(model.forward_all(x, width=widths), y).item()

    before = loss_now()
    for _ in range(5):
        loss = joint_loss(model.forward_all(x, width=widths), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert after < before - 0.05, f"joint loss {before:.4f} -> {after:.4f}"


# --- a run and its outputs -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, data: ImageDataset) -> tuple[Path, dict, Path, list[float]]:
    """A 2-epoch run; a copy of its train_state.pt at the end of epoch 1 stands in for an interrupted run.

    The last item is the loss of every step, recorded around ``train_step``.
    """
    root = tmp_path_factory.mktemp("runs")
    run, mid = root / "two_epochs", root / "interrupted_train_state.pt"
    original = train_mod._save_state
    losses, step = _recording_train_step()

    def save_and_keep_epoch_one(path, model, optimizer, cfg, step, elapsed):
        original(path, model, optimizer, cfg, step, elapsed)
        if step == STEPS_PER_EPOCH:
            shutil.copy(path, mid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_save_state", save_and_keep_epoch_one)
        mp.setattr(train_mod, "train_step", step)
        summary = train(_config(run, epochs=2), data=data)
    assert mid.is_file()
    return run, summary, mid, losses


def _recording_train_step():
    """A list and a ``train_step`` that appends each step's loss to it."""
    losses: list[float] = []
    original = train_mod.train_step

    def recording(*args, **kwargs):
        loss = original(*args, **kwargs)
        losses.append(loss.item())
        return loss

    return losses, recording


def _ema(values: list[float], decay: float = 0.95) -> float:
    ema = values[0]
    for v in values[1:]:
        ema = decay * ema + (1 - decay) * v
    return ema


def test_train_writes_its_outputs(two_epoch_run) -> None:
    run, summary, _, losses = two_epoch_run
    for name in ("config.yaml", "train_state.pt", "log.jsonl", "backbone.safetensors"):
        assert (run / name).is_file(), name
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert summary["backbone"] == str(run / "backbone.safetensors")
    assert summary["sha256"] == file_sha256(run / "backbone.safetensors")
    assert len(losses) == 2 * STEPS_PER_EPOCH
    assert summary["final_loss"] == pytest.approx(_ema(losses), rel=1e-12)  # the EMA of the step losses

    saved_cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert saved_cfg["model"] == "adaperceiver_test" and saved_cfg["epochs"] == 2 and saved_cfg["out"] == str(run)

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == 2 * STEPS_PER_EPOCH and log[-1]["losses/joint"] == losses[-1]
    assert all(torch.isfinite(torch.tensor(r["losses/joint"])) for r in log)

    state = torch.load(run / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 2 * STEPS_PER_EPOCH

    model = load_backbone(run / "backbone.safetensors")
    assert isinstance(model, AdaPerceiver) and model.cfg.name == "adaperceiver_test"
    assert model.checkpoint_info["steps"] == 2 * STEPS_PER_EPOCH
    assert model.checkpoint_info["train_config"]["model"] == "adaperceiver_test"
    for key, value in state["model"].items():  # the final train state and the backbone hold the same weights
        assert torch.equal(model.state_dict()[key], value), key
    with torch.no_grad():
        logits = model.forward_all(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 3, 3, 10) and torch.isfinite(logits).all()


def test_bf16_without_native_support_trains_in_fp32(tmp_path: Path, data: ImageDataset, monkeypatch) -> None:
    """Emulated bf16 is several times slower than fp32, so ``bf16: true`` must fall back (same weights as fp32)."""
    monkeypatch.setattr(train_mod, "native_bf16", lambda: False)
    train(_config(tmp_path / "asked_bf16", bf16=True), data=data)
    train(_config(tmp_path / "fp32", bf16=False), data=data)
    _assert_same_weights(tmp_path / "asked_bf16", tmp_path / "fp32")
    assert load_backbone(tmp_path / "asked_bf16" / "backbone.safetensors").checkpoint_info["precision"] == "fp32"


def test_conv_stem_runs_in_fp32_under_bf16_autocast() -> None:
    """oneDNN's bf16 convolutions are slow on CPU, so the stem opts out of autocast; the blocks still use it."""
    model = create_model("adaperceiver_test", stem="conv", stem_dims=(8, 8), patch_size=4)
    x = torch.rand(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.stem(x)
        assert model.blocks[0].mlp.fc1(tokens).dtype == torch.bfloat16
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, model.stem(x))


def test_training_learns_the_synthetic_task(data: ImageDataset, square_images, tmp_path, monkeypatch) -> None:
    """48 steps at a higher learning rate: the loss falls well below chance and held-out images are classified."""
    losses, step = _recording_train_step()
    monkeypatch.setattr(train_mod, "train_step", step)
    summary = train(_config(tmp_path / "learn", epochs=6, lr=5e-3, warmup_epochs=0.25), data=data)
    assert len(losses) == 6 * STEPS_PER_EPOCH
    assert summary["final_loss"] == pytest.approx(_ema(losses), rel=1e-12)
    assert summary["final_loss"] < math.log(10) - 0.4, summary["final_loss"]  # chance is log(10) = 2.30
    first, last = losses[:STEPS_PER_EPOCH], losses[-STEPS_PER_EPOCH:]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.5, (first, last)
    held_out = square_images(512, seed=1)
    model = load_backbone(tmp_path / "learn" / "backbone.safetensors")
    with torch.no_grad():
        pred = model(held_out.as_float()).argmax(-1)
    accuracy = (pred == held_out.labels).float().mean().item()
    assert accuracy > 0.4, f"held-out accuracy {accuracy:.3f} (chance 0.1)"


def test_training_changes_the_weights(two_epoch_run) -> None:
    run, *_ = two_epoch_run
    torch.manual_seed(0)  # train() builds its model right after seeding with cfg.seed = 0
    init = create_model("adaperceiver_test").state_dict()
    trained = _weights(run)
    assert any(not torch.equal(init[k], trained[k]) for k in trained)


# --- determinism and resume ----------------------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(two_epoch_run, data: ImageDataset, tmp_path) -> None:
    run, summary, *_ = two_epoch_run
    again = train(_config(tmp_path / "again", epochs=2), data=data)
    _assert_same_weights(run, tmp_path / "again")
    assert again["final_loss"] == summary["final_loss"]
    train(_config(tmp_path / "seed1", epochs=2, seed=1), data=data)
    w0, w1 = _weights(run), _weights(tmp_path / "seed1")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "seed has no effect"


def _count_steps(monkeypatch) -> list[int]:
    """Count the training steps a run executes (train() calls joint_loss once per step)."""
    calls: list[int] = []

    def counting_loss(*args, **kwargs):
        calls.append(1)
        return joint_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "joint_loss", counting_loss)
    return calls


def test_resume_interrupted_run_is_exact(two_epoch_run, data: ImageDataset, tmp_path, monkeypatch) -> None:
    run, _, mid, _ = two_epoch_run
    assert torch.load(mid, map_location="cpu", weights_only=False)["step"] == STEPS_PER_EPOCH
    calls = _count_steps(monkeypatch)
    summary = train(_config(tmp_path / "resumed", epochs=2), resume=str(mid), data=data)
    assert len(calls) == STEPS_PER_EPOCH, "a resumed run must start at the saved step"
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    _assert_same_weights(run, tmp_path / "resumed")


def test_resume_refuses_a_changed_schedule(data: ImageDataset, tmp_path) -> None:
    """Extending a finished 1-epoch run to 2 epochs would follow another LR schedule than a 2-epoch run: refused."""
    one = tmp_path / "one_epoch"
    train(_config(one, epochs=1), data=data)
    with pytest.raises(ValueError, match=r"different \['epochs'\]: \[1\]; resuming would follow another schedule"):
        train(_config(tmp_path / "continued", epochs=2), resume=str(one / "train_state.pt"), data=data)


def test_resume_refuses_other_model_config(two_epoch_run, data: ImageDataset, tmp_path) -> None:
    _, _, mid, _ = two_epoch_run
    cfg = _config(tmp_path / "other", epochs=2, model_overrides={"depth": 2})
    with pytest.raises(ValueError, match=r"different model config"):
        train(cfg, resume=str(mid), data=data)
    with pytest.raises(FileNotFoundError, match=r"--resume: no train_state.pt"):
        train(_config(tmp_path / "other"), resume=str(tmp_path / "missing.pt"), data=data)


def test_fresh_run_into_a_run_folder_is_refused(two_epoch_run, data: ImageDataset) -> None:
    """Training again into a folder that holds a run (without --resume) would append to its log and overwrite its
    state and backbone: refused, and nothing there changes."""
    run = two_epoch_run[0]
    before = {name: (run / name).read_bytes() for name in ("log.jsonl", "train_state.pt", "backbone.safetensors")}
    with pytest.raises(ValueError, match=r"already holds a training run; continue it with --resume"):
        train(_config(run, epochs=2), data=data)
    assert before == {name: (run / name).read_bytes() for name in before}


def test_batch_larger_than_data_is_refused(data: ImageDataset, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"batch_size=1024 is larger than the 512 training images"):
        train(_config(tmp_path / "big", batch_size=1024), data=data)


# --- fine-tuning from a checkpoint (init=) ----------------------------------------------------------------------


def test_init_starts_from_the_checkpoint(two_epoch_run, data: ImageDataset, tmp_path) -> None:
    """At learning rate 0 a run started from a checkpoint ends with exactly its weights; one started fresh does not.
    The backbone records which checkpoint it came from."""
    source = two_epoch_run[0] / "backbone.safetensors"
    frozen = dict(lr=0.0, min_lr=0.0)
    train(_config(tmp_path / "ft", init=str(source), **frozen), data=data)
    train(_config(tmp_path / "fresh", **frozen), data=data)
    trained, fresh = _weights(tmp_path / "ft"), _weights(tmp_path / "fresh")
    expected = safetensors.torch.load_file(str(source))
    assert all(torch.equal(trained[k], expected[k]) for k in expected)
    assert any(not torch.equal(fresh[k], expected[k]) for k in expected)
    info = load_backbone(tmp_path / "ft" / "backbone.safetensors").checkpoint_info
    assert TrainConfig(init=str(source)).run_name().startswith("backbone__ft-backbone__s0__")
    assert info["init_sha256"] == file_sha256(source) and info["train_config"]["init"] == str(source)


def test_init_with_a_new_label_set_replaces_only_the_head(two_epoch_run, data: ImageDataset, tmp_path) -> None:
    source = two_epoch_run[0] / "backbone.safetensors"
    four = ImageDataset(data.images, data.labels % 4, data.classes[:4], "four classes")
    cfg = _config(tmp_path / "ft4", init=str(source), model_overrides={"num_classes": 4}, lr=0.0, min_lr=0.0)
    train(cfg, data=four)
    model = load_backbone(tmp_path / "ft4" / "backbone.safetensors")
    assert model.cfg.num_classes == 4 and model.head.weight.shape == (4, model.cfg.embed_dim)
    expected, trained = safetensors.torch.load_file(str(source)), _weights(tmp_path / "ft4")
    assert {k for k in expected if not torch.equal(trained[k], expected[k])} == {"head.weight", "head.bias"}


def test_init_refuses_what_it_cannot_start_from(two_epoch_run, data: ImageDataset, tmp_path) -> None:
    source = str(two_epoch_run[0] / "backbone.safetensors")
    with pytest.raises(ValueError, match=r"model_overrides may only set num_classes when fine-tuning, got \['depth'\]"):
        train(_config(tmp_path / "a", init=source, model_overrides={"depth": 2}), data=data)
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer, got 'ten'"):
        train(_config(tmp_path / "n", init=source, model_overrides={"num_classes": "ten"}), data=data)
    with pytest.raises(ValueError, match=r"backbone checkpoint not found"):
        train(_config(tmp_path / "b", init=str(tmp_path / "missing.safetensors")), data=data)
    # a run resumed with another starting point would not be the run it continues
    with pytest.raises(ValueError, match=r"different \['init'\]"):
        train(_config(tmp_path / "c", epochs=2, init=source), resume=str(two_epoch_run[2]), data=data)


# --- augmentation --------------------------------------------------------------------------------------------------


def test_random_shift_flip_only_moves_pixels() -> None:
    torch.manual_seed(0)
    images = torch.zeros(32, 2, 12, 10, dtype=torch.uint8)
    images[:, :, 2:-2, 2:-2] = torch.randint(1, 256, (32, 2, 8, 6), dtype=torch.uint8)  # 2-px empty border
    out = random_shift_flip(images, max_shift=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    # nothing falls off the edge, so every image keeps exactly its pixel values (per channel)
    for a, b in zip(images, out, strict=True):
        for ca, cb in zip(a, b, strict=True):
            assert torch.equal(ca.flatten().sort().values, cb.flatten().sort().values)
    # each output is one shift of its input by at most 2 px in each direction, maybe flipped left-right
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    changed = 0
    for i in range(len(images)):
        candidates = [padded[i, :, dy : dy + 12, dx : dx + 10] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in candidates), i
        changed += not torch.equal(out[i], images[i])
    assert changed >= len(images) // 2, "the augmentation almost never changes an image"
    # float images work the same way
    out_f = random_shift_flip(images.float() / 255)
    assert out_f.dtype == torch.float32 and out_f.shape == images.shape


# --- command line --------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "backbone.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_help() -> None:
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "key=value" in result.stdout and "--image-folder" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("  ") and "=" in line]
    listed = [row.split("=")[0].strip() for row in rows]
    assert set(listed) >= {f.name for f in dataclasses.fields(TrainConfig)}, "every TrainConfig option is listed"


def test_cli_unknown_option_is_a_one_line_error() -> None:
    result = _cli("nope=1")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "nope" in lines[0] and "valid options" in lines[0]


def test_cli_unknown_device_is_a_one_line_error(tmp_path: Path) -> None:
    result = _cli("model=adaperceiver_test", "device=gpu0", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device 'gpu0': not a torch device" in lines[0], result.stderr


def test_cli_missing_init_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    result = _cli("model=adaperceiver_test", f"init={tmp_path / 'none.safetensors'}", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "backbone checkpoint not found" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def _image_folder(root: Path, classes: int, per_class: int = 8) -> Path:
    """``root/class<c>/<i>.png``: 28x28 grayscale, the class readable from a bright bar's row."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.full((28, 28), 20, dtype=torch.uint8)
            pixels[4 + 6 * c : 8 + 6 * c, i : i + 12] = 255
            Image.fromarray(pixels.numpy(), "L").save(root / f"class{c}" / f"{i}.png")
    return root


def test_cli_trains_on_an_image_folder(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "images", classes=3)
    common = ("--image-folder", str(root), "model=adaperceiver_test", "epochs=1", "batch_size=8")
    result = _cli(*common, "model_overrides.num_classes=3", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    model = load_backbone(tmp_path / "run" / "backbone.safetensors")
    assert model.cfg.num_classes == 3
    assert model.checkpoint_info["classes"] == ["class0", "class1", "class2"]
    assert model.checkpoint_info["steps"] == 3  # 24 images / batch 8: nothing dropped or added
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["image_folder"] == str(root)
    # a class count the model cannot output is refused with the fix in the message
    bad = _cli(*common, "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "has 3 classes" in lines[0] and "model_overrides.num_classes=3" in lines[0], bad.stderr
    # fine-tuned from that run on a folder of 2 other classes: a new 2-way head, the rest started from the run
    two = _image_folder(tmp_path / "two", classes=2)
    args = ("--image-folder", str(two), f"init={tmp_path / 'run' / 'backbone.safetensors'}", "epochs=1", "batch_size=8")
    tuned = _cli(*args, "model_overrides.num_classes=2", "--out", str(tmp_path / "tuned"))
    assert tuned.returncode == 0, tuned.stderr
    assert "its architecture (adaperceiver_test) is used, not model=adaperceiver_fmnist_stages" in tuned.stderr
    model = load_backbone(tmp_path / "tuned" / "backbone.safetensors")
    assert model.cfg.num_classes == 2 and model.checkpoint_info["classes"] == ["class0", "class1"]
    assert model.checkpoint_info["init_sha256"] == file_sha256(tmp_path / "run" / "backbone.safetensors")


def test_train_step_benchmark_writes_both_precisions(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--model", "adaperceiver_test",
           "--batch-size", "8", "--repeats", "2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for name in ("fp32", "bf16_autocast"):
        times = result[name]["step_s"]
        assert len(times) == 2 and all(t > 0 for t in times)
        assert result[name]["median_step_s"] == pytest.approx(statistics.median(times), rel=1e-12)
    ratio = result["bf16_autocast"]["median_step_s"] / result["fp32"]["median_step_s"]
    assert result["bf16_over_fp32_time"] == pytest.approx(ratio, rel=1e-12)
    assert result["native_bf16"] is train_mod.native_bf16()  # same machine, same answer
    bad = subprocess.run([*cmd[:3], "--repeats", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("--repeats: must be an integer >= 1, got '0'")
