"""Tests for scaling out with torchrun: 2 gloo processes train the parameters of one process with the same global
batch and seed, a killed 2-process run resumes losing only the steps after its last checkpoint, and outcome tables
built by 2 processes equal the single-process tables under the same cache key.

The processes are launched as a user would (``python -m torch.distributed.run --standalone --nproc_per_node 2``),
one thread each; the single-process references run in this process, also on one thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from conftest import torch_threads
from PIL import Image

import backbone.train as train_cli
import envs.build_tables as tables_cli
from backbone import create_model
from backbone.checkpoint import DEFAULT_BACKBONE
from backbone.data import DEFAULT_DATA_DIR

REPO = Path(__file__).resolve().parents[1]
CLASSES = 3
# 42 images of backbone-train (48 less the 10% policy hold-out): 5 steps of global batch 8 per epoch, 40 steps
TRAIN = ("model=adaperceiver_test_stages", f"model_overrides.num_classes={CLASSES}", "epochs=8", "batch_size=8",
         "min_steps=0", "small_data=0", "workers=0", "num_threads=1", "checkpoint_every=2", "seed=3")  # fmt: skip
TOTAL_STEPS = 40


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)


def _write_folder(root: Path, per_class: dict[str, int]) -> Path:
    """``root/<split>/band<c>/<i>.png``: 28x28 noise plus a bright band whose height is the class."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(CLASSES):
            (root / split / f"band{c}").mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 50, (28, 28)).astype(np.uint8)
                px[4 + 8 * c : 10 + 8 * c, i % 6 : 18 + i % 6] = 255
                Image.fromarray(px, "L").save(root / split / f"band{c}" / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("distributed")
    _write_folder(work / "bands", {"train": 16, "test": 6})
    return work


@pytest.fixture
def one_thread():
    """Single-process references on one thread, like the child processes (kernels may sum in another order)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def two_process_run(work: Path) -> tuple[Path, subprocess.CompletedProcess]:
    run = work / "two"
    result = _run(_torchrun("-m", "backbone.train", "--data", str(work / "bands"), *TRAIN, "--out", str(run)))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run / "backbone.safetensors"))


def test_two_processes_train_the_parameters_of_one(two_process_run, work: Path, one_thread, capsys) -> None:
    run, result = two_process_run
    assert train_cli.main(["--data", str(work / "bands"), *TRAIN, "--out", str(work / "one")]) == 0
    one_summary = yaml.safe_load(capsys.readouterr().out)
    two, one = _weights(run), _weights(work / "one")
    torch.manual_seed(3)
    init = create_model("adaperceiver_test_stages", num_classes=CLASSES).state_dict()
    assert two.keys() == one.keys()
    # fp32 sums in another order; AdamW turns the rounding of near-zero gradients into steps of up to lr. Measured
    # over these 40 steps: 2 processes vs 1 differ by up to 3.4e-5, one process on 2 threads vs 1 by 2.9e-5
    tolerance = 1e-4
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=tolerance, msg=f"{key} differs")
    moved = max(float((one[k] - init[k]).abs().max()) for k in one)
    assert moved > 100 * tolerance, "training moves the weights far beyond the tolerance"
    two_summary = yaml.safe_load(result.stdout)  # rank 0 alone prints the summary
    assert two_summary["steps"] == one_summary["steps"] == TOTAL_STEPS
    assert two_summary["final_loss"] == pytest.approx(one_summary["final_loss"], rel=1e-5)  # the global batch's loss
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["world_size"], saved["per_process_batch"], saved["batch_size"]) == (2, 4, 8)
    assert yaml.safe_load((work / "one" / "config.yaml").read_text())["world_size"] == 1
    assert result.stderr.count("training images") == 1, "rank 0 alone reports"


def test_killed_two_process_run_resumes_losing_only_unsaved_steps(two_process_run, work: Path) -> None:
    run = work / "killed"
    cmd = _torchrun("-m", "backbone.train", "--data", str(work / "bands"), *TRAIN, "--out", str(run))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "train_state.pt"
    deadline = time.monotonic() + 60
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends; torchrun passes it on and the workers die at once
    proc.wait(timeout=60)
    saved = torch.load(state, weights_only=False)["step"]
    assert 2 <= saved < TOTAL_STEPS, f"killed at step {saved} of {TOTAL_STEPS}: the test needs a run cut short"
    assert not (run / "backbone.safetensors").exists()

    resumed = _run(_torchrun("-m", "backbone.train", "--data", str(work / "bands"), *TRAIN, "--resume", str(run)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved} of {TOTAL_STEPS}" in resumed.stderr, "resumes from the last checkpoint"
    full, cut = _weights(two_process_run[0]), _weights(run)
    for key in full:
        assert torch.equal(full[key], cut[key]), f"{key}: the resumed run does not end where the uninterrupted one does"


def test_global_batch_that_does_not_divide_is_a_one_line_error(work: Path) -> None:
    bad = _run(_torchrun("-m", "backbone.train", "--data", str(work / "bands"), *TRAIN, "batch_size=7",
                         "--out", str(work / "bad")))  # fmt: skip
    assert bad.returncode != 0
    assert bad.stderr.count("error: batch_size=7 (the global batch) is not divisible by the 2 processes") == 1
    assert not (work / "bad").exists()


def _tables(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every table file under ``cache`` by its path relative to it (the cache key), with its arrays."""
    out = {}
    for f in sorted(cache.rglob("*.npz")):
        with np.load(f) as z:
            out[str(f.relative_to(cache))] = {k: z[k] for k in z.files}
    return out


def _assert_same_tables(sharded: Path, single: Path, expected: int) -> None:
    a, b = _tables(sharded), _tables(single)
    assert len(a) == expected and a.keys() == b.keys(), (a.keys(), b.keys())
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert np.array_equal(a[name][k], b[name][k]), f"{name}: {k} differs"
    assert not list(sharded.rglob("*.parts")), "the chunks are removed once merged"


def test_sharded_image_folder_tables_equal_the_single_process_ones(two_process_run, work: Path, one_thread) -> None:
    # 4 chunks of test (18 images) and 2 of policy-train (6): both ranks build chunks, in batches that split chunks
    common = ["--backbone", str(two_process_run[0] / "backbone.safetensors"), "--data", str(work / "bands"),
              "--workers", "0", "--batch-size", "3", "--chunk-size", "5"]  # fmt: skip
    sharded = _run(_torchrun("-m", "envs.build_tables", *common, "--cache-dir", str(work / "tables2")))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count("test: 18 images") == 1, "rank 0 alone reports"
    assert tables_cli.main([*common, "--cache-dir", str(work / "tables1")]) == 0
    _assert_same_tables(work / "tables2", work / "tables1", expected=2)


@pytest.mark.skipif(not Path(DEFAULT_DATA_DIR, "t10k-images-idx3-ubyte.gz").is_file(), reason="needs Fashion-MNIST")
def test_sharded_fmnist_table_equals_the_single_process_one(work: Path, one_thread) -> None:
    # 5 batches of 7 over 2 ranks: 2 and 3 batches, the last one short
    common = ["--backbone", str(DEFAULT_BACKBONE), "--splits", "test", "--limit", "33", "--batch-size", "7"]
    sharded = _run(_torchrun("-m", "envs.build_tables", *common, "--cache-dir", str(work / "fm2")))
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert tables_cli.main([*common, "--cache-dir", str(work / "fm1")]) == 0
    _assert_same_tables(work / "fm2", work / "fm1", expected=1)


@pytest.mark.parametrize("cli", [train_cli, tables_cli])
def test_help_says_how_to_run_on_several_processes(cli, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "torchrun --nproc_per_node N" in out and "--nnodes" in out and "--rdzv_endpoint" in out
