"""Runs that stop and resume cleanly: Ctrl-C and SIGKILL during PPO, then ``train_policy.py --resume RUN``.

Each test starts ``train_policy.py`` on a tiny backbone as a user would, stops it mid-PPO, resumes it and checks
that the one run folder ends complete: every rollout logged once, timing summed over the parts, the same eval.json
keys as an uninterrupted run, no temp file left.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from backbone import create_model, save_backbone

REPO = Path(__file__).resolve().parent.parent
PPO = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2, "net_arch": [16, 16], "checkpoint_every": 1024}
TIMESTEPS = 24_000  # long enough to be stopped mid-PPO, short enough to finish in seconds after resuming


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    backbone = root / "tiny.safetensors"
    save_backbone(create_model("adaperceiver_test"), backbone)
    config = root / "policy.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/policy.yaml").read_text()), **PPO}))
    return {"root": root, "backbone": backbone, "config": config, "cache": root / "cache"}


def _args(setup: dict[str, Path], *extra: str) -> list[str]:
    return [sys.executable, "train_policy.py", "--config", str(setup["config"]), "--backbone", str(setup["backbone"]),
            "--cache-dir", str(setup["cache"]), "--train-limit", "200", "--eval-limit", "100", "--timesteps",
            str(TIMESTEPS), "--no-progress", *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _ctrl_c_as_in_a_terminal() -> None:
    """Run in the child before exec: SIGINT back to its default action. A test run started in the background
    (``pytest &`` in a script) inherits SIGINT *ignored*, and Python then installs no Ctrl-C handler at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_stop(setup: dict[str, Path], run: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a run, wait until a policy checkpoint exists and PPO has logged past it, then send ``sig``."""
    proc = subprocess.Popen(_args(setup, "--out", str(run)), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "policy.zip").is_file() and len(_timesteps(run)) >= 12:
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _timesteps(run: Path) -> list[int]:
    try:
        with (run / "progress.csv").open() as f:
            return [int(float(r["time/total_timesteps"])) for r in csv.DictReader(f) if r.get("time/total_timesteps")]
    except FileNotFoundError:
        return []


def _resume_and_check(setup: dict[str, Path], run: Path) -> dict:
    saved = json.loads((run / "policy.json").read_text())["timesteps"]
    assert 0 < saved < TIMESTEPS
    done = subprocess.run(_args(setup, "--resume", str(run)), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name], "resume must not create another folder"
    steps = _timesteps(run)
    rollout = PPO["n_envs"] * PPO["n_steps"]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    odd = [g for g in gaps if g != rollout]  # the resume point: rollouts restart from the saved timestep
    assert steps[0] == rollout and steps[-1] >= TIMESTEPS, steps
    # a stop inside a rollout resumes mid-way (rollout < gap < 2 rollouts); a stop after a rollout's last step but
    # before its log line resumes from that boundary and redoes it (gap of exactly 2, that row never logged)
    redone = saved % rollout == 0 and saved not in steps
    assert len(odd) <= 1 and all(rollout < g < 2 * rollout or (g == 2 * rollout and redone) for g in odd), (
        f"each rollout logged once: {odd} (saved at {saved})"
    )
    timing = json.loads((run / "timing.json").read_text())
    assert len(timing["parts"]) == 2 and timing["parts"][0]["timesteps_to"] == saved
    assert timing["parts"][1]["timesteps_from"] == saved and timing["parts"][1]["timesteps_to"] >= TIMESTEPS
    assert timing["ppo_s"] == pytest.approx(sum(p["ppo_s"] for p in timing["parts"]), abs=0.2)
    assert not list(run.glob(".*.tmp")), "no half-written file is left"
    return json.loads((run / "eval.json").read_text())


def test_ctrl_c_saves_and_resume_finishes_the_run(setup) -> None:
    run = setup["root"] / "sigint" / "run"
    stopped = _start_and_stop(setup, run, signal.SIGINT)
    assert stopped.returncode == 130
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: policy saved at") and f"--resume {run}" in lines[0]
    assert "Traceback" not in stopped.stderr and not (run / "eval.json").exists()
    ev = _resume_and_check(setup, run)
    # the same keys as a run that was never interrupted
    whole = setup["root"] / "whole" / "run"
    subprocess.run(_args(setup, "--out", str(whole), "--timesteps", "256"), cwd=REPO, env=_env(), check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    assert set(ev) == set(json.loads((whole / "eval.json").read_text()))


def test_sigkill_then_resume_drops_the_rows_after_the_checkpoint(setup) -> None:
    run = setup["root"] / "sigkill" / "run"
    stopped = _start_and_stop(setup, run, signal.SIGKILL)
    assert stopped.returncode == -signal.SIGKILL
    saved = json.loads((run / "policy.json").read_text())["timesteps"]
    assert _timesteps(run)[-1] > saved, "rows logged after the last checkpoint exist before the resume"
    _resume_and_check(setup, run)


def test_ctrl_c_during_backbone_training_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "backbone_run"
    args = [sys.executable, "-m", "backbone.train", "model=adaperceiver_test", "epochs=1", "batch_size=8",
            "limit_train=4000", "checkpoint_every=10", "monitor_samples=0", "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (run / "train_state.pt").is_file():
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]  # tqdm's bar may precede it on stderr; no traceback follows
    assert last.startswith("interrupted: training state of step") and f"--resume {run}" in last
    assert "Traceback" not in err and not (run / "backbone.safetensors").exists()
    done = subprocess.run([*args[:-2], "--resume", str(run)], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 500 and (run / "backbone.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone_run"], "resume writes into the same folder"
