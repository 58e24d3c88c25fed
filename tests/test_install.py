"""A non-editable install works from any folder: package data, console scripts, outputs in the working directory.

The wheel is built from the repository and installed (without dependencies, which the test environment has) into
a temporary folder that shadows the editable install; every command then runs from an empty folder elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("install")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel_cmd = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(REPO)]
    subprocess.run(wheel_cmd, check=True, capture_output=True, cwd=root)
    wheel = next((root / "dist").glob("*.whl"))
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True)
    empty = root / "elsewhere"
    empty.mkdir()
    return {"site": target, "cwd": empty, "cache": root / "cache"}


def _run(installed: dict[str, Path], script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed["site"]), "OMP_NUM_THREADS": "1",
           "ADAPERCEIVER_CACHE_DIR": str(installed["cache"])}  # fmt: skip
    return subprocess.run([str(installed["site"] / "bin" / script), *args], cwd=installed["cwd"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_wheel_ships_code_data_and_every_console_script(installed) -> None:
    site = installed["site"]
    assert (site / "checkpoints" / "adaperceiver_fmnist.safetensors").stat().st_size > 1_000_000
    assert {p.name for p in (site / "configs").glob("*.yaml")} == {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert SCRIPTS and all((site / "bin" / s).is_file() for s in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_helps_from_any_folder(installed, script: str) -> None:
    r = _run(installed, script, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--" in r.stdout


def test_train_policy_script_runs_on_the_shipped_backbone_and_writes_here(installed) -> None:
    r = _run(installed, "adaperceiver-train-policy", "--timesteps", "512", "--train-limit", "300", "--eval-limit",
             "200", "--n-envs", "2", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    runs = list((installed["cwd"] / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("fmnist__p0.3__s0__")
    ev = json.loads((runs[0] / "eval.json").read_text())
    side = json.loads((runs[0] / "policy.json").read_text())
    assert ev["samples"] == 200 and side["backbone_path"] is None  # the shipped backbone, found as package data
    assert f"{ev['accuracy']:.2%}" in r.stdout
    # the code that ran is the installed copy, not the repository's
    env = {**os.environ, "PYTHONPATH": str(installed["site"])}
    where = subprocess.run([sys.executable, "-c", "import backbone; print(backbone.__file__)"], cwd=installed["cwd"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    assert where.stdout.strip().startswith(str(installed["site"]))
