"""The shipped default backbone: it loads, it is as accurate as documented, and the default environment uses it."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers AdaPerceiverCompute-v0)
from backbone import DEFAULT_BACKBONE, load_backbone
from backbone.data import load_split
from backbone.pareto import significant_steps
from backbone.settings import Setting

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


@pytest.fixture(scope="module")
def shipped():
    return load_backbone(DEFAULT_BACKBONE)


def test_shipped_checkpoint_full_setting_accuracy(shipped) -> None:
    data = load_split("test").subset(2000)
    with torch.inference_mode():
        pred = torch.cat([shipped(x).argmax(-1) for x in data.as_float().split(500)])
    accuracy = (pred == data.labels).float().mean().item()
    assert accuracy >= 0.89, f"full-setting accuracy on the first 2000 test images is {accuracy:.4f}"


def test_committed_evaluation_belongs_to_the_shipped_checkpoint(shipped) -> None:
    result = json.loads((RESULTS / "eval_test.json").read_text())
    assert result["sha256"] == shipped.checkpoint_sha256
    assert result["samples"] == 10_000
    full = max(result["settings"], key=lambda r: r["flops"])
    smallest = min(result["settings"], key=lambda r: r["flops"])
    assert full["accuracy"] >= 0.90 and smallest["accuracy"] >= 0.80  # the targets of issue 3
    # the recorded FLOPs are the model's, and the recorded Pareto flags are the brute-force front of the rows
    rows = result["settings"]
    assert [Setting.of_row(r) for r in rows] == list(shipped.grid)
    assert [r["flops"] for r in rows] == shipped.grid.flops.ravel().tolist()
    assert [r["pareto"] for r in rows] == _brute_force_front_flags(rows)
    assert sum(r["pareto"] for r in rows) >= 3  # the check above is not vacuous


def test_shipped_front_rises_as_issue_18_asks(shipped) -> None:
    """The default's fixed-setting front on test (recomputed from the committed rows, not read from its summary):
    full - smallest >= 3 points, >= 5 settings each above the last by more than a standard error, the smallest
    setting <= 3% of the full setting's FLOPs, and the full setting >= 90%."""
    result = json.loads((RESULTS / "eval_test.json").read_text())
    rows = result["settings"]
    flops = np.array([r["flops"] for r in rows])
    accuracy = np.array([r["accuracy"] for r in rows])
    full, smallest = shipped.grid.full_index, shipped.grid.smallest_index
    full_acc = accuracy[np.ravel_multi_index(full, shipped.grid.shape)]
    small_acc = accuracy[np.ravel_multi_index(smallest, shipped.grid.shape)]
    assert full_acc >= 0.90 and full_acc - small_acc >= 0.03, (full_acc, small_acc)
    assert shipped.grid.flops[smallest] <= 0.03 * shipped.grid.flops[full]
    steps = significant_steps(flops, accuracy, result["samples"])
    assert len(steps) >= 5
    assert result["front"]["significant_steps"] == [str(Setting.of_row(rows[i])) for i in steps]


def _brute_force_front_flags(rows: list[dict]) -> list[bool]:
    """On the front: no other row is cheaper-or-equal and at least as accurate (exact duplicates: first one)."""

    def beats(j: int, i: int) -> bool:
        a, b = rows[j], rows[i]
        if j == i or a["flops"] > b["flops"] or a["accuracy"] < b["accuracy"]:
            return False
        return a["flops"] < b["flops"] or a["accuracy"] > b["accuracy"] or j < i

    return [not any(beats(j, i) for j in range(len(rows))) for i in range(len(rows))]


def _checked_settings(grid) -> list[Setting]:
    """The smallest setting and, for each axis, one step along it (the last width): cheap settings spanning every
    axis, so a wrong stage, token, depth or width index shows."""
    picks = [grid.smallest]
    for i, axis in enumerate(grid.axes):
        index = list(grid.smallest_index)
        index[i] = grid.shape[i] - 1 if axis == "width" else 1
        picks.append(grid.setting(index))
    return picks


def test_shipped_accuracy_of_settings_matches_the_committed_evaluation(shipped) -> None:
    """Re-score a few settings on all 10,000 test images: they must reproduce docs/results/eval_test.json.

    Neighbouring settings differ by a few images (for the issue-3 backbone 4/1/32: 8972 correct, 4/2/32: 8976), so a
    wrong index shows; the tolerance of 2 images allows for argmax ties flipping under other kernels.
    """
    rows = json.loads((RESULTS / "eval_test.json").read_text())["settings"]
    recorded = {Setting.of_row(r): r["accuracy"] for r in rows}
    checked = _checked_settings(shipped.grid)
    data = load_split("test")
    hits = dict.fromkeys(checked, 0)
    with torch.inference_mode():
        for x, y in zip(data.as_float().split(1000), data.labels.split(1000), strict=True):
            memory = shipped.embed(x, shipped.grid.smallest.stage)  # shared by every setting (continued if deeper)
            for setting in checked:
                hits[setting] += int((shipped(memory, *setting).argmax(-1) == y).sum())
    for setting in checked:
        assert hits[setting] / len(data) == pytest.approx(recorded[setting], abs=2e-4), setting


def test_default_environment_uses_the_shipped_backbone(shipped) -> None:
    env = gym.make("AdaPerceiverCompute-v0", flops_penalty=0.3, mode="live")
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    _, reward, terminated, truncated, info = env.step(np.array(shipped.grid.full_index))
    assert terminated and not truncated
    assert Setting.of_row(info) == shipped.grid.full
    # the outcome is the shipped backbone's own prediction on that policy-train image
    data = load_split("policy-train")
    i = info["sample_index"]
    with torch.inference_mode():
        pred = int(shipped(data.as_float()[i : i + 1], *shipped.grid.full).argmax(-1))
    assert (info["pred"], info["label"], info["correct"]) == (pred, int(data.labels[i]), pred == int(data.labels[i]))
    assert reward == pytest.approx(float(info["correct"]) - 0.3)
    assert env.unwrapped.split == "policy-train" and env.unwrapped.n_samples == 10_000


@pytest.mark.slow
def test_default_environment_table_mode_builds_the_policy_split_table() -> None:
    env = gym.make("AdaPerceiverCompute-v0", flops_penalty=0.3)
    assert env.unwrapped.table.correct.shape == (10_000, *load_backbone(DEFAULT_BACKBONE).grid.shape)


def test_evaluate_cli_writes_next_to_a_run_and_draws_another_front(tmp_path: Path) -> None:
    """backbone.evaluate on a checkpoint in a run folder writes its report there (never into docs/results), and
    --compare draws the committed evaluation's front on the same axes; a file that is no report is refused."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DEFAULT_BACKBONE, run / "backbone.safetensors")
    committed = Path(__file__).resolve().parent.parent / "docs" / "results" / "eval_test.json"
    cmd = [sys.executable, "-m", "backbone.evaluate", "--checkpoint", str(run / "backbone.safetensors"), "--split",
           "test", "--limit", "200", "--compare", str(committed)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((run / "eval_test.json").read_text())
    assert report["samples"] == 200 and report["sha256"] == json.loads(committed.read_text())["sha256"]
    assert (run / "eval_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / "eval_test.md").is_file()
    bad = subprocess.run([*cmd[:-1], str(run / "backbone.safetensors")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--compare" in bad.stderr
    # --device runs the sweep there (explicit cpu: the same report); an unknown or absent device is one line
    cpu = subprocess.run([*cmd, "--device", "cpu", "--out", str(tmp_path / "cpu")], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)  # fmt: skip
    assert cpu.returncode == 0, cpu.stderr
    assert json.loads((tmp_path / "cpu" / "eval_test.json").read_text())["settings"] == report["settings"]
    devices = [("nope", "not a torch device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")])
    for device, message in devices:
        bad = subprocess.run([*cmd, "--device", device], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


def test_previous_default_still_loads_and_scores_as_recorded() -> None:
    """The issue-3 backbone (three axes, no stem exits) is still shipped next to the new default: it loads, its
    grid has no stage axis, and its full setting re-scores exactly as its committed evaluation says."""
    path = DEFAULT_BACKBONE.with_name("adaperceiver_fmnist.safetensors")
    old = load_backbone(path)
    result = json.loads((RESULTS / "previous_default" / "eval_test.json").read_text())
    assert result["sha256"] == old.checkpoint_sha256 != load_backbone(DEFAULT_BACKBONE).checkpoint_sha256
    assert old.grid.axes == ("tokens", "depth", "width") and old.grid.shape == (4, 8, 3)
    recorded = {Setting.of_row(r): r["accuracy"] for r in result["settings"]}
    data = load_split("test")
    with torch.inference_mode():
        hits = sum(
            int((old(x).argmax(-1) == y).sum())
            for x, y in zip(data.as_float().split(1000), data.labels.split(1000), strict=True)
        )
    assert hits / len(data) == pytest.approx(recorded[old.grid.full], abs=2e-4)
