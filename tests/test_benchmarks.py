"""The benchmark commands run on the tiny models (with and without the input-side axis) and report what they time.

Speed is not asserted (these are tests, not benchmarks); the figures they print must be consistent with each
other and with the model, so a benchmark that silently measured the wrong thing would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backbone import create_model

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model", ["adaperceiver_test", "adaperceiver_test_stages"])
def test_env_benchmark(model: str, tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    r = _run("benchmarks.bench_env", "--model", model, "--limit", "64", "--steps", "500", "--repeats", "2",
             "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["samples"] == 64 and result["settings"] == len(create_model(model).grid)
    assert len(result["env_steps_per_s_runs"]) == 2
    assert result["us_per_step"] == pytest.approx(1e6 / result["env_steps_per_s_median"], rel=0.01)


@pytest.mark.parametrize("model", ["adaperceiver_test", "adaperceiver_test_stages"])
def test_backbone_benchmark(model: str, tmp_path: Path) -> None:
    out = tmp_path / "backbone.json"
    r = _run("benchmarks.bench_backbone", "--model", model, "--batch-size", "8", "--repeats", "1", "--matmul-size",
             "128", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    m = create_model(model)
    full, smallest = result["settings"]["full"], result["settings"]["smallest"]
    assert full["mflops_per_image"] == pytest.approx(m.grid.full_flops / 1e6)
    assert smallest["mflops_per_image"] == pytest.approx(m.grid.flops.min() / 1e6)
    assert result["smallest_flops_ratio"] == pytest.approx(m.grid.full_flops / m.grid.flops.min())
    assert ("stage" in full) == bool(m.grid.stages)


def test_two_key_attention_benchmark_reports_both_forms_and_the_threshold(tmp_path: Path) -> None:
    """Both forms timed on every shape and in agreement; "taken" is exactly the rows at or above the threshold."""
    from backbone.layers.attention import TWO_KEY_MIN_ROWS

    out = tmp_path / "two_key.json"
    r = _run("benchmarks.two_key_attention", "--batch-sizes", "1", "32", "--repeats", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["min_rows"] == TWO_KEY_MIN_ROWS
    assert [(row["batch"], row["queries"]) for row in result["rows"]] == [(1, 1), (1, 2), (32, 1), (32, 2)]
    for row in result["rows"]:
        assert row["rows"] == row["batch"] * 8 * row["queries"]
        assert row["closed_form_used"] == (row["rows"] >= TWO_KEY_MIN_ROWS)
        assert row["library_us"] > 0 and row["closed_form_us"] > 0 and row["max_abs_diff"] < 1e-5
