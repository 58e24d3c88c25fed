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


def load_table(setup) -> tuple:
    """The command's backbone and its outcome table on policy-train, read back from the test's cache."""
    model = load_backbone(setup["backbone"])
    cfg = build_policy_config(None, backbone=str(setup["backbone"]), cache_dir=str(setup["cache"]),
                              observation=OBSERVATION, train_limit=N)  # fmt: skip
    return model, outcome_table(model, cfg, "policy-train", N, progress=False)


def refit(model, table, seed: int, drop_points: float, folds: int = 3) -> tuple[np.ndarray, list[tuple]]:
    """Independently of the command: each fold's iso cascade fitted on the other folds (drawn with ``seed``), every
    image's action from its fold's cascade, and per fold (cascade, fit accuracy, held-out accuracy)."""
    split = np.array_split(np.random.default_rng(seed).permutation(len(table)), folds)
    actions = np.empty((len(table), table.grid.ndim), np.int64)
    fits = []
    for k, held in enumerate(split):
        rest = np.concatenate([f for j, f in enumerate(split) if j != k])
        cascade, fit_acc, _ = fit_cascade_to_accuracy(model, table.subset(rest), drop_points / 100)
        actions[held] = cascade.table_actions(table.subset(held))
        fits.append((cascade, fit_acc, table.correct[(held, *actions[held].T)].mean()))
    return actions, fits


def test_every_image_is_judged_by_a_cascade_fitted_without_it(setup, capsys) -> None:
    out = setup["root"] / "report"
    assert main([*setup["args"], "--iso-drops", "0", "5", "--out", str(out)]) == 0
    result = json.loads((out / "iso_holdout.json").read_text())
    assert "| 5 points |" in (out / "iso_holdout.md").read_text() and "iso-accuracy" in capsys.readouterr().out
    assert [r["iso_drop_points"] for r in result["rows"]] == [0, 5] and result["samples"] == N

    model, table = load_table(setup)
    spec = get_observation(OBSERVATION)
    for row in result["rows"]:
        actions, fits = refit(model, table, 0, row["iso_drop_points"])  # as the command must have
        for k, (cascade, fit_acc, _) in enumerate(fits):
            assert (row["folds"][k]["tau"], row["folds"][k]["train_accuracy"]) == (cascade.tau, fit_acc)
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


def test_repeats_refit_on_every_fold_assignment(setup) -> None:
    """``--repeats 3``: seeds 0, 1, 2 each get their own folds and refits; the first one is the row itself."""
    out = setup["root"] / "repeats"
    assert main([*setup["args"], "--iso-drops", "5", "--repeats", "3", "--out", str(out)]) == 0
    result = json.loads((out / "iso_holdout.json").read_text())
    row = result["rows"][0]
    assert result["repeats"] == 3 and [r["seed"] for r in row["repeats"]] == [0, 1, 2]
    headline = ("accuracy", "mean_flops", "gap", "folds")
    assert {k: row["repeats"][0][k] for k in headline} == {k: row[k] for k in headline}
    model, table = load_table(setup)
    spec = get_observation(OBSERVATION)
    per_fold = set()
    for rep in row["repeats"]:  # refit each assignment's folds independently of the command
        actions, fits = refit(model, table, rep["seed"], 5)
        for k, (_, _, held_out) in enumerate(fits):
            assert rep["folds"][k]["held_out_accuracy"] == pytest.approx(held_out)
        m = evaluate_actions(table, actions, spec.flops(model), spec.reused_flops(model))
        assert (rep["accuracy"], rep["mean_flops"]) == (m["accuracy"], m["mean_flops"])
        assert rep["meets_iso_accuracy"] == iso_check(rep, table.grid.table(table.accuracy()))["meets_iso_accuracy"]
        per_fold.add(tuple(f["held_out_accuracy"] for f in rep["folds"]))
    assert len(per_fold) == 3, "the assignments' folds scored alike, so this test could not tell the seeds apart"
    md = (out / "iso_holdout.md").read_text()
    assert "Over 3 fold assignments (seeds 0..2" in md and " of 3 |" in md


def test_one_repeat_adds_no_spread_table(setup) -> None:
    out = setup["root"] / "one"
    assert main([*setup["args"], "--iso-drops", "5", "--out", str(out)]) == 0
    result = json.loads((out / "iso_holdout.json").read_text())
    assert result["repeats"] == 1 and [r["seed"] for r in result["rows"][0]["repeats"]] == [0]
    assert "fold assignments" not in (out / "iso_holdout.md").read_text()
