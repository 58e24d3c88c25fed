"""``policy.iso_holdout``: the iso-accuracy cascade fitted on all folds but one and judged on the one held out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backbone import create_model, save_backbone
from backbone.checkpoint import load_backbone
from envs import get_observation
from policy.cascade import OBSERVATION, fit_cascade_to_accuracy
from policy.config import build_policy_config
from policy.evaluation import evaluate_actions, iso_check
from policy.iso_holdout import main
from policy.training import outcome_table

N = 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("iso_holdout")
    torch.manual_seed(0)
    backbone = root / "staged.safetensors"
    save_backbone(create_model("adaperceiver_test_stages", ls_init_values=1.0).eval(), backbone)
    cache = root / "cache"
    args = ["--backbone", str(backbone), "--cache-dir", str(cache), "--train-limit", str(N), "--folds", "3"]
    return {"root": root, "backbone": backbone, "cache": cache, "args": args}


def test_every_image_is_judged_by_a_cascade_fitted_without_it(setup, capsys) -> None:
    out = setup["root"] / "report"
    assert main([*setup["args"], "--iso-drops", "0", "5", "--out", str(out)]) == 0
    result = json.loads((out / "iso_holdout.json").read_text())
    assert "| 5 points |" in (out / "iso_holdout.md").read_text() and "iso-accuracy" in capsys.readouterr().out
    assert [r["iso_drop_points"] for r in result["rows"]] == [0, 5] and result["samples"] == N

    model = load_backbone(setup["backbone"])
    cfg = build_policy_config(None, backbone=str(setup["backbone"]), cache_dir=str(setup["cache"]),
                              observation=OBSERVATION, train_limit=N)  # fmt: skip
    table = outcome_table(model, cfg, "policy-train", N, progress=False)
    folds = np.array_split(np.random.default_rng(0).permutation(N), 3)
    spec = get_observation(OBSERVATION)
    for row in result["rows"]:
        actions = np.empty((N, table.grid.ndim), np.int64)
        for k, held in enumerate(folds):  # refit each fold on the other two, as the command must have
            rest = np.concatenate([f for j, f in enumerate(folds) if j != k])
            cascade, fit_acc, _ = fit_cascade_to_accuracy(model, table.subset(rest), row["iso_drop_points"] / 100)
            assert (row["folds"][k]["tau"], row["folds"][k]["train_accuracy"]) == (cascade.tau, fit_acc)
            actions[held] = cascade.table_actions(table.subset(held))
        m = evaluate_actions(table, actions, spec.flops(model), spec.reused_flops(model))
        assert (row["accuracy"], row["mean_flops"]) == (m["accuracy"], m["mean_flops"])
        check = iso_check(row, table.grid.table(table.accuracy()))
        assert {k: row[k] for k in check} == check
        full = table.correct[(slice(None), *table.grid.full_index)].mean()
        assert row["gap"] == pytest.approx(full - row["accuracy"])


def test_bad_options_are_one_line_errors(setup, capsys) -> None:
    out = setup["root"] / "bad"
    assert main([*setup["args"], "--iso-drops", "-1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --iso-drops are points of accuracy in [0, 100), got [-1.0]\n"
    assert main([*setup["args"][:-2], "--folds", "100", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {N} samples are too few for 100 folds\n"
    assert not out.exists()
