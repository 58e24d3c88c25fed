"""SettingsGrid: the one place that turns action indices into settings and knows what each setting costs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from timm.optim import create_optimizer_v2

from backbone import create_model
from backbone.settings import Setting, SettingsGrid


@pytest.fixture(scope="module")
def grid() -> SettingsGrid:
    return create_model("adaperceiver_test").grid  # tokens (2, 4, 8), depth 1..3, widths (8, 16, 32)


def test_index_and_setting_round_trip_in_c_order(grid: SettingsGrid) -> None:
    expected = list(itertools.product((2, 4, 8), (1, 2, 3), (8, 16, 32)))
    assert [tuple(s)[:3] for s in grid] == expected and all(s.stage is None for s in grid)
    for index, setting in zip(grid.indices(), expected, strict=True):
        assert grid.setting(index) == Setting(*setting) and grid.index(setting) == index
    assert grid.setting(np.array([1, 2, 0])) == Setting(4, 3, 8) and str(Setting(4, 3, 8)) == "4/3/8"
    tokens, depth, width, stage = grid.values(np.array([[0, 0, 0], [2, 1, 2], [1, 2, 1]]))
    assert tokens.tolist() == [2, 8, 4] and depth.tolist() == [1, 2, 3] and width.tolist() == [8, 32, 16]
    assert stage is None


def test_flops_are_the_models_analytic_flops(grid: SettingsGrid) -> None:
    model = create_model("adaperceiver_test")
    assert grid.flops.shape == grid.shape == (3, 3, 3)
    for index in grid.indices():
        assert grid.flops[index] == model.flops(*grid.setting(index))
    actions = np.array([[0, 0, 0], [2, 2, 2], [1, 0, 2]])
    assert grid.flops_of(actions).tolist() == [model.flops(2, 1, 8), model.flops(8, 3, 32), model.flops(4, 1, 32)]
    assert grid.full == Setting(8, 3, 32) and grid.full_flops == model.flops() == grid.flops.max()
    assert grid.smallest == Setting(2, 1, 8) and grid.flops[grid.smallest_index] == grid.flops.min()
    assert grid.relative_cost()[grid.full_index] == 1.0


@pytest.mark.parametrize("index", [(3, 0, 0), (0, -1, 0), (0, 0, 3), (0, 0)])
def test_index_outside_the_grid_is_refused(grid: SettingsGrid, index) -> None:
    with pytest.raises(ValueError, match=r"outside the 3 x 3 x 3 settings grid|3 integers"):
        grid.setting(index)


def test_batch_of_settings_equals_each_row_and_refuses_a_bad_row(grid: SettingsGrid) -> None:
    """``settings`` (one numpy pass) gives what ``setting`` gives row by row, as Python ints, with stages too."""
    rows = np.array(list(grid.indices()))
    assert grid.settings(rows) == [grid.setting(r) for r in rows]
    assert all(type(v) is int for s in grid.settings(rows) for v in s[:3])
    staged = create_model("adaperceiver_test_stages").grid
    rows = np.array(list(staged.indices()))[::-7]
    assert staged.settings(rows) == [staged.setting(r) for r in rows] and staged.settings(rows)[0].stage is not None
    assert grid.settings(np.zeros((0, 3), dtype=np.int64)) == []
    for bad, shown in (([[0, 0, 0], [0, 3, 0]], r"\[0, 3, 0\]"), ([[0, 0, 0], [0, 0, -1]], r"\[0, 0, -1\]")):
        with pytest.raises(ValueError, match=rf"index {shown} is outside the 3 x 3 x 3 settings grid"):
            grid.settings(np.array(bad))


def test_unknown_setting_names_the_valid_values(grid: SettingsGrid) -> None:
    with pytest.raises(ValueError, match=r"tokens=5 is not in the settings grid; choose one of \[2, 4, 8\]"):
        grid.index((5, 1, 8))
    with pytest.raises(ValueError, match=r"width=12"):
        grid.index((2, 1, 12))


def test_json_round_trip_and_older_tables_depth_list(grid: SettingsGrid) -> None:
    data = grid.to_json()
    assert data == {"token_granularities": [2, 4, 8], "depth": 3, "widths": [8, 16, 32]}
    assert SettingsGrid.from_json(data, grid.flops) == grid
    legacy = {**data, "depth": [1, 2, 3]}  # outcome tables of format 2 wrote depth as the list 1..L
    assert grid.matches(legacy) and SettingsGrid.from_json(legacy, grid.flops) == grid
    assert not grid.matches({**data, "widths": [8, 32]})
    with pytest.raises(ValueError, match="recorded FLOPs"):
        SettingsGrid.from_json(data, grid.flops[:2])
    other = create_model("adaperceiver_test", embed_dim=64, widths=(16, 32, 64)).grid
    assert other != grid


def test_table_rows_flag_exactly_the_pareto_front(grid: SettingsGrid) -> None:
    rng = np.random.default_rng(0)
    accuracy = rng.random(grid.shape)
    rows = grid.table(accuracy)
    assert [(r["tokens"], r["depth"], r["width"]) for r in rows] == [tuple(s)[:3] for s in grid]
    for r in rows:  # brute force: on the front iff no setting costing <= it is at least as accurate
        dominated = any(
            o is not r and o["flops"] <= r["flops"] and o["accuracy"] >= r["accuracy"]
            and (o["flops"], -o["accuracy"]) < (r["flops"], -r["accuracy"])
            for o in rows
        )  # fmt: skip
        assert r["pareto"] == (not dominated)
    with pytest.raises(ValueError, match="accuracy has shape"):
        grid.table(accuracy[:2])


def test_embeddings_are_not_weight_decayed() -> None:
    """timm's convention (``no_weight_decay``): position embedding, latent and output query are not decayed."""
    model = create_model("adaperceiver_test")
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name in ("pos_embed", "latent", "out_query"):
        assert id(getattr(model, name)) in no_decay, name
    assert id(model.head.weight) not in no_decay
