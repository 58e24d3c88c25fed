"""Tests for the sequential controller's episode: the environment (checkers, table = live, returns), the table
rollout that scores a controller, and compute-saving inference that stops rows between blocks for real.

Tiny ``adaperceiver_test_stages`` model (input stages 0/1/2) with perturbed weights, 96 images, one thread.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from conftest import torch_threads
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import backbone
from backbone.data import DEFAULT_DATA_DIR, FASHION_MNIST_CLASSES, ImageDataset, load_split
from envs import SEQUENTIAL_ENV_ID, AdaPerceiverSequentialEnv, OutcomeTable, get_observation
from envs.sequential_steps import GO_ON, STOP

N_IMAGES = 96
SPLIT = "policy-train"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model() -> backbone.AdaPerceiver:
    torch.manual_seed(0)
    model = backbone.create_model("adaperceiver_test_stages", ls_init_values=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def dataset() -> ImageDataset:
    if Path(DEFAULT_DATA_DIR, "train-images-idx3-ubyte.gz").is_file():
        return load_split(SPLIT).subset(N_IMAGES)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 10, (N_IMAGES,), generator=g), FASHION_MNIST_CLASSES, "synthetic")


@pytest.fixture(scope="module")
def table(model, dataset) -> OutcomeTable:
    return OutcomeTable.build(model, dataset, SPLIT, progress=False)


def make_env(model, dataset, table=None, **kwargs) -> AdaPerceiverSequentialEnv:
    return AdaPerceiverSequentialEnv(backbone=model, dataset=dataset, table=table, **kwargs)


def play(env, choice, stop_after: int, seed: int):
    """One episode: ``choice`` at step 0, then go on until ``stop_after`` blocks; (obs list, rewards, info)."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    action = np.array([*choice, GO_ON])
    done, info, depth = False, {}, 1
    while not done:
        obs, reward, done, truncated, info = env.step(action)
        assert not truncated
        observations.append(obs)
        rewards.append(reward)
        action = np.array([*choice, STOP if depth >= stop_after else GO_ON])
        depth += 1
    return observations, rewards, info


@pytest.mark.parametrize("mode", ["table", "live"])
def test_checkers_pass(model, dataset, table, mode):
    env = gymnasium.make(SEQUENTIAL_ENV_ID, backbone=model, dataset=dataset, table=table, mode=mode,
                         disable_env_checker=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(make_env(model, dataset, table, mode=mode), warn=True)


def test_table_and_live_give_the_same_episodes(model, dataset, table):
    table_env = make_env(model, dataset, table, flops_penalty=0.5, decision_flops=1000)
    live_env = make_env(model, dataset, mode="live", flops_penalty=0.5, decision_flops=1000)
    depth = len(model.grid.depths)
    choices = [(s, k, m) for s in range(3) for k in range(model.grid.shape[1]) for m in range(model.grid.shape[3])]
    for seed, choice in enumerate(choices):
        stop_after = 1 + seed % depth
        obs_t, rew_t, info_t = play(table_env, choice, stop_after, seed)
        obs_l, rew_l, info_l = play(live_env, choice, stop_after, seed)
        assert info_t == info_l
        assert info_t["depth"] == stop_after
        np.testing.assert_allclose(rew_t, rew_l, rtol=1e-5, atol=1e-6)
        for a, b in zip(obs_t, obs_l, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_return_is_correct_minus_penalty_times_spent_flops(model, dataset, table):
    penalty = 0.7
    env = make_env(model, dataset, table, flops_penalty=penalty, decision_flops=5000)
    spent = env.steps.spent_flops()
    grid, depth = model.grid, len(model.grid.depths)
    for seed in range(12):
        choice = (seed % 3, seed % grid.shape[1], seed % grid.shape[3])
        _, rewards, info = play(env, choice, 1 + seed % depth, seed)
        index = grid.index(model.grid.setting((choice[0], choice[1], info["depth"] - 1, choice[2])))
        assert info["flops"] == spent[index]
        expected = float(table.correct[(info["sample_index"], *index)]) - penalty * spent[index] / grid.full_flops
        assert sum(rewards) == pytest.approx(expected, abs=1e-9)
        assert len(rewards) == min(info["depth"] + 1, depth)  # step 0, then one decision per block but the last


def test_spent_flops_count_every_write_out_and_decision(model):
    from envs.sequential_steps import SequentialSteps

    spec = get_observation("pooled_probe")
    steps = SequentialSteps.for_model(model, spec, decision_flops=777)
    grid, cfg = model.grid, model.cfg
    spent = steps.spent_flops()
    for index in grid.indices():
        s = grid.setting(index)
        write = sum(v for k, v in backbone.flops.flops_breakdown(cfg, s.tokens, 1, s.width, s.stage).items()
                    if k in ("write", "head"))  # fmt: skip
        decisions = min(s.depth, cfg.depth - 1)
        assert spent[index] == grid.flops[index] + (s.depth - 1) * write + decisions * (777 + 6 * cfg.num_classes)


def test_bad_actions_and_steps_are_refused(model, dataset, table):
    env = make_env(model, dataset, table)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0, 0, 0, 0]))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="MultiDiscrete"):
        env.step(np.array([0, 0, 0]))
    with pytest.raises(ValueError, match="MultiDiscrete"):
        env.step(np.array([0, 0, 9, 0]))
    with pytest.raises(ValueError, match="decision_flops"):
        make_env(model, dataset, table, decision_flops=-1)


# --- training, table scoring and compute-saving inference ------------------------------------------------------
@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory) -> Path:
    from backbone import save_backbone
    from policy import build_policy_config, train_controller

    root = tmp_path_factory.mktemp("sequential")
    torch.manual_seed(0)
    tiny = backbone.create_model("adaperceiver_test_stages", ls_init_values=1.0)
    with torch.no_grad():
        for p in tiny.parameters():
            p.add_(0.3 * torch.randn_like(p))  # far from init: settings and depths predict differently
    save_backbone(tiny, root / "tiny.safetensors")
    cfg = build_policy_config(
        None, backbone=str(root / "tiny.safetensors"), out=str(root / "run"), cache_dir=str(root / "cache"),
        controller="sequential", train_limit=300, eval_limit=200, n_envs=2, n_steps=64, batch_size=64, n_epochs=2,
        timesteps=512, net_arch=[16, 16], flops_penalty=0.3,
    )  # fmt: skip
    out, _ = train_controller(cfg, progress=False)
    return out


def test_sequential_run_records_its_episode_and_prices(sequential_run):
    import json

    side = json.loads((sequential_run / "policy.json").read_text())
    ev = json.loads((sequential_run / "eval.json").read_text())
    assert side["controller"] == ev["controller"] == "sequential"
    assert side["decision_flops"] == side["actor_flops"] > 0  # every decision runs the same actor
    assert side["controller_flops"] == side["obs_flops"] + side["actor_flops"] == ev["controller_flops"]
    assert ev["samples"] == 200 and sum(ev["setting_counts"].values()) == 200


def test_sequential_inference_runs_what_the_table_scored(sequential_run):
    """Inference on the 200 test images the run was scored on: each image exits where the table rollout says
    (decisions from live statistics equal the looked-up ones), its prediction is the one of running it alone at its
    exit setting, and its FLOPs are the priced ones."""
    import json

    from policy.sequential_inference import SequentialClassifier

    ev = json.loads((sequential_run / "eval.json").read_text())
    clf = SequentialClassifier.load(sequential_run)
    data = load_split("test").subset(200)
    x = data.as_float()
    pred = clf.predict(x)
    counts: dict[str, int] = {}
    for s in pred.settings:
        counts[str(s)] = counts.get(str(s), 0) + 1
    assert counts == ev["setting_counts"]
    assert len({s.depth for s in pred.settings}) > 1  # the controller did stop rows at different blocks
    assert ev["accuracy"] == (pred.labels == data.labels).sum().item() / 200
    assert ev["mean_flops"] == pytest.approx(float(pred.flops.mean()), rel=1e-12)
    with torch.no_grad():
        for i in range(0, 200, 7):
            alone = clf.backbone(x[i : i + 1], *pred.settings[i])
            torch.testing.assert_close(pred.logits[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    # FlopCounterMode sees every matmul, convolution and attention (the decision network's too), not the element-wise
    # pooling and prediction statistics the analytic count also has
    from backbone.flops import flop_counter
    from backbone.prediction_stats import stats_flops
    from envs.observations import _pooled_flops

    some = range(0, 200, 10)
    decisions = sum(int(clf.steps.decisions(pred.settings[i].depth)) for i in some)
    per_stats = stats_flops(clf.backbone.cfg.num_classes)
    elementwise = len(some) * (_pooled_flops(clf.backbone) + per_stats) + decisions * per_stats
    with flop_counter() as counted:
        for i in some:
            clf.predict(x[i : i + 1])
    assert counted.get_total_flops() == sum(pred.flops[i] for i in some) - elementwise


def test_rows_on_the_probe_path_reuse_it_and_every_row_equals_running_alone(sequential_run):
    """A scripted controller (a fixed rule on the observation) sends about half the images down the probe's own path
    (its stage, tokens and width) and stops rows at every depth: predictions still equal each image run alone at its
    exit setting, and FLOPs, with the probe's read, block and write-out not counted twice, equal FlopCounterMode."""
    from backbone.flops import flop_counter
    from backbone.prediction_stats import stats_flops
    from envs.observations import _pooled_flops
    from policy.sequential_inference import SequentialClassifier

    clf = SequentialClassifier.load(sequential_run)
    dims = clf.steps.action_nvec

    def scripted(obs: np.ndarray) -> np.ndarray:
        key = (np.abs(obs).sum(1) * 1000).astype(np.int64)  # deterministic, depends on the image and the step
        actions = np.stack([key % n for n in dims], axis=1)
        actions[key % 2 == 0, :-1] = 0  # the probe's path: stage, tokens and width index 0
        return actions

    clf._decide = scripted
    x = load_split("test").subset(60).as_float()
    pred = clf.predict(x)
    on_probe_path = clf.continues_probe[tuple(pred.actions.T)]
    assert 10 < on_probe_path.sum() < 50 and len({s.depth for s in pred.settings}) == len(clf.grid.depths)
    with torch.no_grad():
        for i in range(60):
            torch.testing.assert_close(pred.logits[i : i + 1], clf.backbone(x[i : i + 1], *pred.settings[i]),
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    per_stats = stats_flops(clf.backbone.cfg.num_classes)
    decisions = sum(int(clf.steps.decisions(s.depth)) for s in pred.settings)
    elementwise = 60 * (_pooled_flops(clf.backbone) + per_stats) + decisions * per_stats
    with flop_counter() as counted:
        for i in range(60):
            clf.predict(x[i : i + 1])
    # the scripted rule has no network: the actor FLOPs the prices include did not run
    actor = (60 + decisions) * clf.steps.decision_flops
    assert counted.get_total_flops() == int(pred.flops.sum()) - elementwise - actor


def test_a_oneshot_run_is_refused_by_sequential_inference(sequential_run, tmp_path):
    import json
    import shutil

    from policy.sequential_inference import SequentialClassifier

    other = tmp_path / "oneshot"
    shutil.copytree(sequential_run, other)
    side = json.loads((other / "policy.json").read_text())
    (other / "policy.json").write_text(json.dumps({**side, "controller": "oneshot"}))
    with pytest.raises(ValueError, match="not a sequential one"):
        SequentialClassifier.load(other)
