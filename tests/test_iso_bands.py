"""``policy.iso_bands``: the probe against the setting it hands over to, per band of its confidence, on two splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backbone import create_model, save_backbone
from backbone.checkpoint import load_backbone
from envs import get_observation
from envs.observations import probe_setting
from policy.cascade import OBSERVATION
from policy.config import build_policy_config
from policy.iso_bands import band_counts, best_within, main
from policy.training import outcome_table

N = 60


def test_band_counts_on_a_hand_made_split() -> None:
    conf = np.array([0.1, 0.5, 0.92, 0.93, 0.94, 0.99, 1.0])
    probe_ok = np.array([0, 1, 0, 1, 0, 1, 1], dtype=bool)
    x_ok = np.array([1, 1, 1, 0, 0, 1, 0], dtype=bool)
    rows = band_counts(conf, probe_ok, x_ok, edges=(0.0, 0.9, 0.95, 1.0))
    assert [r["images"] for r in rows] == [2, 3, 2]  # 1.0 falls in the last band, which is closed
    assert [(r["probe_wrong"], r["probe_right"]) for r in rows] == [(1, 0), (1, 1), (0, 1)]
    assert rows[1]["probe_accuracy"] == pytest.approx(1 / 3) and rows[1]["x_accuracy"] == pytest.approx(1 / 3)
    assert band_counts(conf, probe_ok, x_ok, edges=(0.0, 0.05))[0]["probe_accuracy"] is None  # an empty band


def test_best_within_a_budget() -> None:
    acc = np.array([[0.80, 0.90], [0.95, 0.90]])
    cost = np.array([[1.0, 2.0], [5.0, 2.0]])
    assert best_within(acc, cost, 4.0) == (0, 1)  # the first of the two 0.90 entries; 0.95 costs too much
    assert best_within(acc, cost, 5.0) == (1, 0)
    assert best_within(acc, cost, 0.5) is None


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("iso_bands")
    torch.manual_seed(0)
    backbone = root / "staged.safetensors"
    save_backbone(create_model("adaperceiver_test_stages", ls_init_values=1.0).eval(), backbone)
    cache = root / "cache"
    args = ["--backbone", str(backbone), "--cache-dir", str(cache), "--train-limit", str(N), "--eval-limit", str(N)]
    return {"root": root, "backbone": backbone, "cache": cache, "args": args}


def test_report_agrees_with_the_tables(setup, capsys) -> None:
    out = setup["root"] / "report"
    model = load_backbone(setup["backbone"])
    x = model.grid.setting((model.grid.shape[0] - 1, 0, 0, 0))  # the deepest stage's cheapest setting
    assert main([*setup["args"], "--setting", str(x), "--out", str(out)]) == 0
    result = json.loads((out / "iso_bands.json").read_text())
    assert f"against X = {x}" in capsys.readouterr().out and (out / "iso_bands.md").is_file()
    assert result["setting"] == str(x) and set(result["splits"]) == {"policy-train", "test"}

    cfg = build_policy_config(None, backbone=str(setup["backbone"]), cache_dir=str(setup["cache"]),
                              observation=OBSERVATION)  # fmt: skip
    spec = get_observation(OBSERVATION)
    grid, xi = model.grid, model.grid.index(x)
    probe = grid.index(probe_setting(model))
    for split, s in result["splits"].items():
        table = outcome_table(model, cfg, split, N, progress=False)
        probe_ok, x_ok = table.correct[(slice(None), *probe)], table.correct[(slice(None), *xi)]
        assert sum(b["images"] for b in s["bands"]) == N
        wrong = sum(b["probe_wrong"] for b in s["bands"]) - sum(b["probe_right"] for b in s["bands"])
        assert wrong == int(x_ok.sum()) - int(probe_ok.sum())  # every disagreement is in exactly one band
        extra = grid.flops - spec.reused_flops(model)  # what the probe or X costs beyond the work it reuses
        for row in s["cascade"]:  # each tau's cascade, image by image, computed here independently
            sure = table.confidence[(slice(None), *probe)] >= row["tau"]
            ok = np.where(sure, probe_ok, x_ok)
            cost = spec.flops(model) + np.where(sure, extra[probe], extra[xi])
            assert (row["accuracy"], row["mean_flops"]) == (pytest.approx(ok.mean()), pytest.approx(cost.mean()))
    # the bound is the most accurate cascade within the budget, or none when even the cheapest costs more
    bound, md = result["chosen_on_test"], (out / "iso_bands.md").read_text()
    assert "tau" in bound or "none, every cascade costs more" in md
    if "tau" in bound:
        assert bound["mean_flops"] <= bound["budget_flops"]


def test_unknown_setting_is_a_one_line_error(setup, capsys) -> None:
    out = setup["root"] / "bad"
    assert main([*setup["args"], "--setting", "s9/1/1/1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: setting 's9/1/1/1' is not in the settings grid") and err.count("\n") == 1
    assert not out.exists()
