"""Tests for envs: observation specs, outcome tables, the compute environment and its vectorised copies.

All tests use the tiny ``adaperceiver_test`` size with perturbed random weights (so different settings predict
differently) and 128 images; the whole file runs in a few seconds on one thread.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from conftest import torch_threads
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import backbone
import envs
import envs.compute_env
from backbone.data import DEFAULT_DATA_DIR, FASHION_MNIST_CLASSES, ImageDataset, load_split
from envs import (
    ENV_ID,
    OBSERVATIONS,
    AdaPerceiverComputeEnv,
    OutcomeTable,
    backbone_identity,
    get_observation,
    load_or_build,
    make_vec_env,
)

N_IMAGES = 128
SPLIT = "policy-train"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):  # a training job shares this machine
        yield


def perturbed_model(seed: int = 0, scale: float = 0.3) -> backbone.AdaPerceiver:
    """Tiny model whose blocks matter (LayerScale 1) and whose weights are far from init."""
    torch.manual_seed(seed)
    model = backbone.create_model("adaperceiver_test", ls_init_values=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> backbone.AdaPerceiver:
    return perturbed_model()


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    if Path(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz").is_file():
        return load_split(SPLIT).subset(N_IMAGES)
    g = torch.Generator().manual_seed(0)  # synthetic stand-in where the real files are not installed
    images = torch.randint(0, 256, (N_IMAGES, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)
    return ImageDataset(images, labels, FASHION_MNIST_CLASSES, "synthetic")


@pytest.fixture(scope="module")
def table(model, dataset) -> OutcomeTable:
    return OutcomeTable.build(model, dataset, SPLIT, progress=False)


def make_env(model, dataset, table=None, **kwargs) -> AdaPerceiverComputeEnv:
    return AdaPerceiverComputeEnv(backbone=model, dataset=dataset, table=table, **kwargs)


def all_actions(env) -> list[np.ndarray]:
    nt, nd, nw = env.action_space.nvec
    return [np.array([t, d, w]) for t in range(nt) for d in range(nd) for w in range(nw)]


# --- checkers and registration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["table", "live"])
def test_gymnasium_and_sb3_check_env(model, dataset, table, mode):
    env = gymnasium.make(ENV_ID, backbone=model, dataset=dataset, table=table, mode=mode, disable_env_checker=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkers report problems as warnings
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(make_env(model, dataset, table, mode=mode), warn=True)


def test_gymnasium_make(model, dataset, tmp_path):
    env = gymnasium.make(ENV_ID, backbone=model, dataset=dataset, flops_penalty=0.3, cache_dir=tmp_path)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and 0 <= info["sample_index"] < N_IMAGES
    action = np.array([1, 2, 0])
    _, reward, terminated, truncated, info = env.step(action)
    assert terminated and not truncated
    table = env.unwrapped.table  # built from the given backbone: its outcome pays the 0.3 penalty on relative FLOPs
    outcome = float(model(dataset.as_float()[info["sample_index"]][None], 4, 3, 8).argmax(-1) == int(info["label"]))
    assert info["correct"] == bool(outcome) and info["label"] == int(dataset.labels[info["sample_index"]])
    assert type(reward) is float and reward == pytest.approx(outcome - 0.3 * table.flops[1, 2, 0] / table.flops.max())
    assert env.unwrapped.flops_penalty == 0.3 and env.unwrapped.split == SPLIT


def test_registration_is_idempotent():
    import importlib

    importlib.reload(envs)
    assert ENV_ID in gymnasium.registry


def test_default_backbone_missing_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(envs.compute_env, "DEFAULT_BACKBONE", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"not found.*backbone.train"):
        gymnasium.make(ENV_ID, flops_penalty=0.3)


# --- episode semantics ---------------------------------------------------------------------------------------------
def test_step_reward_and_info(model, dataset, table):
    env = make_env(model, dataset, table, flops_penalty=0.5)
    full = table.grid.full_flops
    for action in all_actions(env):
        obs0, info0 = env.reset(seed=3)
        obs, reward, terminated, truncated, info = env.step(action)
        k, j, m = action.tolist()
        i = info0["sample_index"]
        assert obs.dtype == np.float32 and np.array_equal(obs, obs0) and terminated and not truncated
        assert type(reward) is float
        assert reward == pytest.approx(float(table.correct[i, k, j, m]) - 0.5 * table.flops[k, j, m] / full)
        assert info == {
            "tokens": model.cfg.token_granularities[k],
            "depth": j + 1,
            "width": model.cfg.widths[m],
            "flops": model.flops(model.cfg.token_granularities[k], j + 1, model.cfg.widths[m]),
            "correct": bool(table.correct[i, k, j, m]),
            "pred": int(table.pred[i, k, j, m]),
            "label": int(dataset.labels[i]),
            "sample_index": i,
        }
        assert type(info["correct"]) is bool and type(info["pred"]) is int


def test_neg_ce_reward(model, dataset, table):
    env = make_env(model, dataset, table, reward="neg_ce", flops_penalty=0.0)
    _, info = env.reset(seed=1)
    _, reward, *_ = env.step(np.array([0, 0, 0]))
    assert reward == pytest.approx(-float(table.loss[info["sample_index"], 0, 0, 0]))


@pytest.mark.parametrize("reward", ["correct", "neg_ce"])
def test_table_and_live_modes_agree(model, dataset, table, reward):
    table_env = make_env(model, dataset, table, reward=reward)
    live_env = make_env(model, dataset, mode="live", reward=reward)
    assert live_env.table is None
    assert live_env.grid == table_env.grid
    assert live_env.obs_flops == table_env.obs_flops
    seeds = range(6) if reward == "correct" else range(2)
    for seed in seeds:
        for action in all_actions(table_env):
            obs_t, info_t = table_env.reset(seed=seed)
            obs_l, info_l = live_env.reset(seed=seed)
            assert info_t == info_l
            np.testing.assert_allclose(obs_t, obs_l, rtol=1e-4, atol=1e-5)
            step_t, step_l = table_env.step(action), live_env.step(action)
            assert step_t[4] == step_l[4]  # setting, flops, correct, pred, label, sample
            if reward == "correct":
                assert step_t[1] == step_l[1]
            else:
                assert step_t[1] == pytest.approx(step_l[1], rel=1e-4, abs=1e-5)


def test_seeding_reproduces_samples_and_rewards(model, dataset, table):
    def rollout(seed: int) -> tuple[list[int], list[float]]:
        env = make_env(model, dataset, table)
        env.action_space.seed(seed)
        idx, rewards = [], []
        _, info = env.reset(seed=seed)
        for _ in range(20):
            idx.append(info["sample_index"])
            rewards.append(env.step(env.action_space.sample())[1])
            _, info = env.reset()
        return idx, rewards

    assert rollout(7) == rollout(7)
    assert rollout(7)[0] != rollout(8)[0]


def test_reset_options_pick_a_sample(model, dataset, table):
    env = make_env(model, dataset, table)
    obs, info = env.reset(options={"sample_index": 5})
    assert info["sample_index"] == 5 and np.array_equal(obs, table.obs[5])
    with pytest.raises(ValueError, match="sample_index"):
        env.reset(options={"sample_index": N_IMAGES})


def test_step_before_reset_and_after_episode_end(model, dataset, table):
    env = make_env(model, dataset, table)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0, 0, 0]))
    env.reset(seed=0)
    env.step(np.array([0, 0, 0]))
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0, 0, 0]))


@pytest.mark.parametrize(
    ("action", "match"),
    [
        (np.array([0, 0]), "3 integers"),
        (np.array([0, 0, 0, 0]), "3 integers"),
        (np.array([-1, 0, 0]), "outside the"),
        (np.array([0, 3, 0]), "outside the"),
        (np.array([0, 0, 99]), "outside the"),
        (np.array([0.5, 0, 0]), "non-integer"),
        ([0, "a", 0], "non-integer"),
        (np.array([0, np.nan, 0]), "non-integer"),
    ],
)
def test_bad_actions(model, dataset, table, action, match):
    env = make_env(model, dataset, table)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        env.step(action)


def test_other_action_types_accepted(model, dataset, table):
    env = make_env(model, dataset, table)
    for action in (
        [1, 2, 0],
        (1, 2, 0),
        np.array([1.0, 2.0, 0.0]),
        torch.tensor([1, 2, 0]),
        np.array([1, 2, 0], np.uint8),
    ):
        env.reset(seed=0)
        assert env.step(action)[4]["depth"] == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flops_penalty": -0.1}, "flops_penalty"),
        ({"flops_penalty": float("nan")}, "flops_penalty"),
        ({"flops_penalty": float("inf")}, "flops_penalty"),
        ({"flops_penalty": "0.3"}, "flops_penalty"),
        ({"reward": "accuracy"}, "correct.*neg_ce"),
        ({"mode": "fast"}, "table.*live"),
        ({"observation": "pixels"}, "pooled_probe"),
        ({"render_mode": "human"}, "render"),
    ],
)
def test_bad_arguments(model, dataset, table, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(model, dataset, table, **kwargs)


def test_bad_split_and_data(model, dataset, table, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*policy-train"):
        AdaPerceiverComputeEnv(backbone=model, split="validation")
    empty = copy.copy(dataset)
    empty.images, empty.labels = dataset.images[:0], dataset.labels[:0]
    with pytest.raises(ValueError, match="empty"):
        make_env(model, empty)
    with pytest.raises(ValueError, match=r"does not match.*split"):
        make_env(model, dataset, table, split="test")
    with pytest.raises(ValueError, match=r"does not match.*backbone"):
        make_env(perturbed_model(seed=1), dataset, table)
    with pytest.raises(ValueError, match=r"does not match.*observation"):
        make_env(model, dataset, table, observation="probe")
    with pytest.raises(ValueError, match="other samples"):
        make_env(model, dataset.subset(N_IMAGES - 1), table)
    with pytest.raises(TypeError, match="backbone"):
        AdaPerceiverComputeEnv(backbone=42, dataset=dataset)


# --- outcome table -------------------------------------------------------------------------------------------------
def test_table_matches_direct_evaluation(model, dataset, table):
    rng = np.random.default_rng(0)
    x = dataset.as_float()
    k_, l_, m_ = table.grid.shape
    with torch.no_grad():
        for i, k, j, m in zip(*(rng.integers(0, n, 40).tolist() for n in (N_IMAGES, k_, l_, m_)), strict=True):
            g, d, w = model.cfg.token_granularities[k], j + 1, model.cfg.widths[m]
            logits = model(x[i : i + 1], num_tokens=g, depth=d, width=w)
            pred = int(logits.argmax(-1))
            assert table.correct[i, k, j, m] == (pred == int(dataset.labels[i]))
            assert table.pred[i, k, j, m] == pred
    assert 0 < table.correct.mean() < 1
    assert (table.pred != table.pred[:, :1, :1, :1]).any(), "settings should disagree for a useful test model"


def test_table_shapes_flops_and_obs_bounds(model, table):
    k, j, m = model.grid.shape
    assert table.correct.shape == table.loss.shape == table.pred.shape == (N_IMAGES, k, j, m)
    assert table.correct.dtype == bool and table.loss.dtype == np.float32 and table.pred.dtype == np.int16
    assert table.labels.dtype == np.int64 and table.obs.dtype == np.float32 and table.flops.dtype == np.int64
    for (g, d, w, _), f in zip(list(model.grid), table.flops.reshape(-1), strict=True):
        assert f == model.flops(g, d, w)
    assert table.grid.full_index == (k - 1, j - 1, m - 1)
    recount = np.zeros((k, j, m))
    for row in table.correct:  # from the raw per-sample array, one image at a time
        recount += row
    np.testing.assert_allclose(table.accuracy(), recount / N_IMAGES, rtol=0, atol=1e-12)
    assert table.grid.to_json() == {"token_granularities": [2, 4, 8], "depth": 3, "widths": [8, 16, 32]}
    assert 0 < table.obs_flops < table.flops.min()
    env_space = gymnasium.spaces.Box(
        OBSERVATIONS["pooled_probe"].low(model), OBSERVATIONS["pooled_probe"].high(model), dtype=np.float32
    )
    assert all(env_space.contains(o) for o in table.obs)


@pytest.mark.parametrize("name", list(OBSERVATIONS))
def test_observation_specs(model, dataset, name):
    spec = get_observation(name)
    with torch.no_grad():
        obs = spec.compute(model, model.embed(dataset.as_float()[:32]))
    assert obs.shape == (32, spec.dim(model)) and obs.dtype == torch.float32
    low, high = spec.low(model), spec.high(model)
    assert low.dtype == high.dtype == np.float32 and np.isfinite(low).all() and np.isfinite(high).all()
    assert (obs.numpy() >= low).all() and (obs.numpy() <= high).all()
    assert 0 < spec.flops(model) < min(model.flops(*s) for s in list(model.grid))
    d, p = model.cfg.token_dim, model.cfg.num_patches
    if name == "pooled":
        assert spec.flops(model) == p * d + 8 * d
    if name == "pooled_probe":
        assert spec.flops(model) == OBSERVATIONS["pooled"].flops(model) + OBSERVATIONS["probe"].flops(model)


def test_pooled_observation_follows_the_patch_token_width():
    """With narrow patch tokens (``patch_dim``) the pooled feature has ``patch_dim`` values, bounds and FLOPs."""
    narrow = backbone.create_model("adaperceiver_test", patch_dim=16).eval()
    spec = get_observation("pooled_probe")
    with torch.no_grad():
        obs = spec.compute(narrow, narrow.embed(torch.rand(4, 1, 28, 28)))
    assert obs.shape == (4, 16 + 3) == (4, spec.dim(narrow))
    assert (obs.numpy() >= spec.low(narrow)).all() and (obs.numpy() <= spec.high(narrow)).all()
    assert get_observation("pooled").flops(narrow) == narrow.cfg.num_patches * 16 + 8 * 16


def test_unknown_observation_lists_names():
    with pytest.raises(ValueError, match=r"pooled_probe.*pooled.*probe"):
        get_observation("nope")


def test_save_load_round_trip(table, tmp_path):
    path = table.save(tmp_path / "sub" / "t.npz")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = OutcomeTable.load(path)
    for name in ("correct", "loss", "pred", "labels", "obs", "flops"):
        a, b = getattr(table, name), getattr(loaded, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert loaded.metadata() == table.metadata()
    (tmp_path / "bad.npz").write_bytes(b"not a table")
    with pytest.raises(ValueError, match="not a readable outcome table"):
        OutcomeTable.load(tmp_path / "bad.npz")


def test_load_or_build_caches_and_rebuilds(model, dataset, tmp_path, monkeypatch, capsys):
    first = load_or_build(model, SPLIT, dataset=dataset, cache_dir=tmp_path, progress=False)
    sha = backbone_identity(model)
    path = tmp_path / sha[:16] / f"{SPLIT}__pooled_probe__n{N_IMAGES}.npz"
    assert path.is_file()

    real_build = OutcomeTable.build

    def no_build(*args, **kwargs):
        raise AssertionError("should have loaded the cached table")

    monkeypatch.setattr(OutcomeTable, "build", no_build)
    second = load_or_build(model, SPLIT, dataset=dataset, cache_dir=tmp_path, progress=False)
    assert np.array_equal(second.correct, first.correct) and second.backbone_sha256 == sha

    stale = copy.copy(first)
    stale.backbone_sha256 = "0" * 64
    stale.save(path)
    monkeypatch.setattr(OutcomeTable, "build", real_build)
    third = load_or_build(model, SPLIT, dataset=dataset, cache_dir=tmp_path, progress=False)
    assert third.backbone_sha256 == sha and OutcomeTable.load(path).backbone_sha256 == sha
    err = capsys.readouterr().err
    assert "stale" in err and "rebuilding" in err


def test_cache_dir_from_environment(model, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPERCEIVER_CACHE_DIR", str(tmp_path))
    load_or_build(model, SPLIT, dataset=dataset, observation="probe", progress=False)
    assert list(tmp_path.glob(f"*/{SPLIT}__probe__n{N_IMAGES}.npz"))


def test_backbone_identity(model):
    assert backbone_identity(model) == backbone_identity(perturbed_model())
    assert backbone_identity(model) != backbone_identity(perturbed_model(seed=1))
    other = perturbed_model()
    other.checkpoint_sha256 = "ab" * 32
    assert backbone_identity(other) == "ab" * 32


# --- vectorised ----------------------------------------------------------------------------------------------------
def test_make_vec_env_dummy(model, dataset, tmp_path):
    vec = make_vec_env(n_envs=3, seed=0, backbone=model, dataset=dataset, cache_dir=tmp_path)
    assert isinstance(vec, DummyVecEnv) and vec.num_envs == 3 and isinstance(vec.envs[0], Monitor)
    tables = {id(e.unwrapped.table) for e in vec.envs}
    assert len(tables) == 1, "copies share one table"
    assert vec.envs[0].unwrapped._rewards is vec.envs[2].unwrapped._rewards, "and one reward matrix"
    obs = vec.reset()
    assert obs.shape == (3, vec.observation_space.shape[0])
    actions = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    obs, rewards, dones, infos = vec.step(actions)
    assert rewards.shape == (3,) and dones.all() and [i["tokens"] for i in infos] == [2, 4, 8]
    table, full = vec.envs[0].unwrapped.table, vec.envs[0].unwrapped.table.grid.full_flops
    for (k, d, m), reward, info in zip(actions, rewards, infos, strict=True):
        i = info["sample_index"]
        assert reward == pytest.approx(float(table.correct[i, k, d, m]) - 0.3 * table.flops[k, d, m] / full)
    with pytest.raises(ValueError, match=r"dummy.*subproc"):
        make_vec_env(vec_env="threads", backbone=model, dataset=dataset)


def test_make_vec_env_subproc(model, dataset, table):
    vec = make_vec_env(
        n_envs=2, seed=0, vec_env="subproc", vec_env_kwargs={"start_method": "fork"}, backbone=model, table=table
    )
    try:
        assert isinstance(vec, SubprocVecEnv) and vec.num_envs == 2
        vec.reset()
        actions = np.array([[0, 0, 0], [2, 2, 2]])
        _, rewards, dones, infos = vec.step(actions)
        assert dones.all() and infos[1]["depth"] == 3
        full = table.grid.full_flops
        for (k, d, m), reward, info in zip(actions, rewards, infos, strict=True):
            i = info["sample_index"]
            assert reward == pytest.approx(float(table.correct[i, k, d, m]) - 0.3 * table.flops[k, d, m] / full)
    finally:
        vec.close()
