"""The input-side axis (issue 18): stem exits, continued rather than recomputed, through the whole pipeline.

A backbone with ``stem_exits`` can stop its conv stem early; every part that runs or prices a setting must agree:
analytic FLOPs and FlopCounterMode, continuing a stage equals running it from the image, per-sample stages equal
per-stage runs, outcome tables equal single-setting runs, and compute-saving inference (which continues the probe
stage's stem for deeper stages) equals each image run alone and costs what it reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from backbone import create_model, measure_flops, save_backbone
from backbone.data import load_split
from backbone.flops import flop_counter, read_is_folded
from backbone.settings import Setting
from backbone.sweep import sweep
from backbone.training import joint_loss, sample_stages, train_step
from envs import AdaPerceiverComputeEnv, OutcomeTable
from policy import AdaptiveClassifier, build_policy_config, train_controller

REPO = Path(__file__).resolve().parent.parent
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    """8 heads of width 4, so that reads of 2 and 4 latents are folded and reads of 8 project the keys/values: both
    kinds of read run side by side at every stage below."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test_stages", ls_init_values=1.0, num_heads=8).eval()
    assert [read_is_folded(m.cfg, g) for g in m.cfg.token_granularities] == [True, True, False]
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_split("test").subset(24).as_float()


def test_grid_has_a_leading_stage_axis(model) -> None:
    grid = model.grid
    assert grid.axes == ("stage", "tokens", "depth", "width") and grid.shape == (4, 3, 3, 3)
    assert grid.smallest == Setting(2, 1, 8, 0) and grid.full == Setting(8, 3, 32, 3)
    assert str(grid.full) == "s3/8/3/32" and grid.index((4, 2, 16, 2)) == (2, 1, 1, 1)
    assert grid.to_json()["stages"] == [0, 1, 2, 3]
    # deeper stages cost more at every (tokens, depth, width); the stage axis is the cheapest way down
    assert (np.diff(grid.flops, axis=0) > 0).all()
    assert grid.flops[grid.smallest_index] == grid.flops.min()


@pytest.mark.parametrize("name", ["adaperceiver_test_stages", "adaperceiver_fmnist_stages"])
def test_flops_match_the_counter_at_every_stage(name: str) -> None:
    m = create_model(name).eval()
    x = torch.rand(1, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size)
    for stage in m.cfg.stages:
        for s in (m.grid.smallest._replace(stage=stage), m.grid.full._replace(stage=stage)):
            counted = measure_flops(m, x, num_tokens=s.tokens, depth=s.depth, width=s.width, stage=s.stage)
            assert m.flops(*s) == counted, s  # exact: every matmul and convolution is in the analytic count


def test_continuing_the_stem_equals_running_the_stage(model, images) -> None:
    with torch.no_grad():
        first = model.embed(images, 0)
        for stage in (1, 2, 3):
            direct, continued = model.embed(images, stage), model.continue_embed(first, stage)
            torch.testing.assert_close(continued.tokens, direct.tokens, atol=ATOL, rtol=0)
            torch.testing.assert_close(model(first, 4, 2, 16, stage), model(images, 4, 2, 16, stage), atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="cannot continue a stage-3 memory to stage 0"):
            model.continue_embed(model.embed(images, 3), 0)


def test_continuing_some_rows_equals_running_them_alone(model, images) -> None:
    """``continue_embed(memory, stage, rows)`` (the feature map gathered alone) equals embedding those images."""
    rows = torch.tensor([3, 0, 5])
    with torch.no_grad():
        first = model.embed(images, 0)
        for stage in (0, 2, 3):
            part = model.continue_embed(first, stage, rows)
            direct = model.embed(images[rows], stage)
            torch.testing.assert_close(part.tokens, direct.tokens, atol=ATOL, rtol=0)
            for got, want in zip(model.read_keys_values(part), model.read_keys_values(direct), strict=True):
                torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_per_sample_stages_equal_per_stage_runs(model, images) -> None:
    stages = torch.tensor([1, 3, 0, 2] * (len(images) // 4))
    with torch.no_grad():
        mixed = model.embed_per_sample(images, stages)
        for stage in (0, 1, 2, 3):
            rows = stages == stage
            torch.testing.assert_close(mixed.tokens[rows], model.embed(images[rows], stage).tokens, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"stages \[4\] are not input stages"):
        model.embed_per_sample(images, torch.full((len(images),), 4))


def test_the_deepest_stage_is_the_model_without_exits(model, images) -> None:
    plain = create_model("adaperceiver_test_stages", stem_exits=(), num_heads=model.cfg.num_heads).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("stem.exits.") for k in unexpected) and unexpected
    with torch.no_grad():
        torch.testing.assert_close(plain(images), model(images), atol=0, rtol=0)
    assert plain.flops() == model.flops()


def test_sweep_equals_single_setting_runs(model, images) -> None:
    labels = torch.randint(10, (len(images),))
    result = sweep(model, images, labels, batch_size=10)
    assert result.correct.shape == (len(images), *model.grid.shape)
    for index in [(0, 0, 0, 0), (1, 2, 1, 2), (2, 1, 2, 1), (3, 2, 2, 2), (3, 0, 1, 0)]:
        s = model.grid.setting(index)
        with torch.no_grad():
            pred = model(images, *s).argmax(-1)
        np.testing.assert_array_equal(result.pred[(slice(None), *index)], pred.numpy(), err_msg=str(s))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"stem": "patch", "stem_exits": (1,)}, "needs the conv stem"),
        ({"stem_exits": (3,)}, r"strictly increasing conv counts in 0..2"),
        ({"stem_exits": (-1,)}, r"strictly increasing conv counts in 0..2"),
        ({"stem_exits": (2, 1)}, "strictly increasing"),
        ({"stem_strides": (1, 1, 4), "stem_exits": (1,), "patch_size": 4}, None),
    ],
)
def test_bad_stem_exits_are_refused(overrides: dict, match: str | None) -> None:
    if match is None:  # a valid variant builds
        assert create_model("adaperceiver_test_stages", **overrides).cfg.stages == (1, 3)
        return
    with pytest.raises(ValueError, match=match):
        create_model("adaperceiver_test_stages", **overrides)


# --- training -------------------------------------------------------------------------------------------------------


def test_sandwich_step_trains_every_stage(square_images) -> None:
    """Each step trains every image at the deepest stage and at a random shallower one, distilled in place from
    the deepest stage: the step's loss is exactly that sum, every exit projection gets a gradient, and repeating
    the step on one batch fits it at every stage."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test_stages", ls_init_values=1.0).train()
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(m, "adamw", lr=3e-3, weight_decay=0.0)
    data = square_images(32, 0)
    x, y = data.as_float(), data.labels
    w = torch.tensor(m.cfg.widths)[torch.randint(3, (32,))].sort().values
    stages = sample_stages(m.cfg.stages, 32)
    assert set(stages.tolist()) == {0, 1, 2}
    with torch.no_grad():
        deep = m.forward_all(x, width=w)
        expected = joint_loss(deep, y) + joint_loss(
            m.forward_all(m.embed_per_sample(x, stages), width=w), y, teacher_logits=deep[:, -1, -1], distill_weight=0.5
        )
    first = train_step(m, optimizer, x, y, w, False, 0.0, 0.0, stages, 0.5)
    torch.testing.assert_close(first, expected)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.stem.exits.parameters())

    def stage_losses() -> list[float]:  # each stage on the images it is trained at (the deepest: all of them)
        rows = [stages == 0, stages == 1, stages == 2, torch.ones(32, dtype=torch.bool)]
        with torch.no_grad():
            return [torch.nn.functional.cross_entropy(m(x[r], width=w[r], stage=s), y[r]).item()
                    for r, s in zip(rows, m.cfg.stages, strict=True)]  # fmt: skip

    before = stage_losses()
    for _ in range(60):
        train_step(m, optimizer, x, y, w, False, 0.0, 0.0, stages, 0.5)
    after = stage_losses()
    assert all(a < b - 0.5 for a, b in zip(after, before, strict=True)), (before, after)


def test_in_place_distillation_mixes_kl_to_the_teacher() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 2, 3, 5), torch.randint(5, (4,))
    teacher = logits[:, -1, -1].detach()
    plain = joint_loss(logits, labels)
    assert joint_loss(logits, labels, teacher_logits=teacher, distill_weight=0.0) == plain
    mixed = joint_loss(logits, labels, teacher_logits=teacher, distill_weight=0.5)
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), teacher.log_softmax(-1)[:, None, None].expand_as(logits),
                                    log_target=True, reduction="none").sum(-1)  # fmt: skip
    weights = torch.arange(1, 4, dtype=torch.float32)
    expected = 0.5 * plain + 0.5 * ((kl.mean(dim=(0, 1)) * weights).sum() / weights.sum())
    torch.testing.assert_close(mixed, expected)


# --- environment, controller, compute-saving inference --------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, model) -> dict:
    root = tmp_path_factory.mktemp("stages")
    backbone = root / "staged.safetensors"
    save_backbone(model, backbone)
    config = root / "policy.yaml"
    small = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2, "timesteps": 512, "net_arch": [16, 16]}
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/policy.yaml").read_text()), **small}))
    cfg = build_policy_config(config, backbone=str(backbone), out=str(root / "run"), cache_dir=str(root / "cache"),
                              train_limit=200, eval_limit=100, flops_penalty=0.1)  # fmt: skip
    out, metrics = train_controller(cfg, progress=False)
    return {"run": out, "metrics": metrics, "backbone": backbone}


def test_environment_acts_on_four_axes(staged_run, model) -> None:
    data = load_split("policy-train").subset(40)
    table = OutcomeTable.build(model, data, "policy-train", progress=False)
    for mode in ("table", "live"):
        env = AdaPerceiverComputeEnv(backbone=model, split="policy-train", dataset=data, table=table, mode=mode)
        assert env.action_space.nvec.tolist() == [4, 3, 3, 3]
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(AdaPerceiverComputeEnv(backbone=model, split="policy-train", dataset=data, table=table,
                                             mode=mode), warn=True)  # fmt: skip
    table_env = AdaPerceiverComputeEnv(backbone=model, split="policy-train", dataset=data, table=table)
    live_env = AdaPerceiverComputeEnv(backbone=model, split="policy-train", dataset=data, table=table, mode="live")
    for i, action in enumerate([(0, 0, 0, 0), (2, 1, 2, 1), (1, 2, 0, 2), (3, 2, 2, 2)]):
        for env in (table_env, live_env):
            env.reset(options={"sample_index": i})
        a, b = (env.step(np.array(action)) for env in (table_env, live_env))
        assert a[1] == pytest.approx(b[1], abs=1e-9) and a[4] == b[4]
        assert a[4]["stage"] == model.grid.stages[action[0]]


def test_adaptive_inference_equals_each_image_alone_and_costs_what_it_reports(staged_run, images) -> None:
    clf = AdaptiveClassifier.load(staged_run["run"])
    pred = clf.predict(images)
    assert len({s.stage for s in pred.settings}) >= 1
    for i in range(len(images)):
        s = pred.settings[i]
        with torch.no_grad():
            alone = clf.backbone(images[i : i + 1], *s)
        torch.testing.assert_close(pred.logits[i : i + 1], alone, atol=ATOL, rtol=ATOL)
    cfg = clf.backbone.cfg
    elementwise = cfg.num_patches * cfg.token_dim + 8 * cfg.token_dim + 6 * cfg.num_classes  # pooling + stats
    with flop_counter() as counted:
        for i in range(len(images)):
            clf.predict(images[i : i + 1])
    assert counted.get_total_flops() == pytest.approx(pred.flops.sum() - len(images) * elementwise, rel=0.01)


def test_every_stage_is_priced_and_run_for_real(staged_run, images) -> None:
    """Force each stage (and the probe's own setting) through predict by hand-picked actions: the reported FLOPs
    equal FlopCounterMode on the real run, whatever the stage, so continuing the stem is counted once."""
    clf = AdaptiveClassifier.load(staged_run["run"])
    cfg = clf.backbone.cfg
    elementwise = cfg.num_patches * cfg.token_dim + 8 * cfg.token_dim + 6 * cfg.num_classes
    for action in [(0, 0, 0, 0), (0, 0, 2, 0), (1, 1, 1, 1), (2, 2, 2, 2), (3, 2, 2, 2), (3, 0, 0, 0)]:
        clf.choose = lambda memory, probe_logits=None, a=action: np.tile(a, (len(memory.tokens), 1))
        x = images[:1]
        with flop_counter() as counted:
            pred = clf.predict(x)
        assert pred.settings == [clf.grid.setting(action)]
        # the policy network is bypassed here, so its FLOPs are not in the count
        actor = clf.controller_flops - clf.spec.flops(clf.backbone)
        assert counted.get_total_flops() == pytest.approx(pred.flops[0] - elementwise - actor, rel=0.01), action
        with torch.no_grad():
            torch.testing.assert_close(pred.logits, clf.backbone(x, *pred.settings[0]), atol=ATOL, rtol=ATOL)
    # one batch mixing folded reads (2, 4 latents) and projected ones (8) at the same stages, each row equal to its
    # image run alone, and the keys/values projected only for the rows that read them (the FLOPs say so)
    mixed = np.array([(0, 0, 1, 0), (0, 2, 1, 1), (0, 1, 2, 2), (3, 2, 0, 0), (3, 0, 2, 1), (0, 2, 2, 2)])
    clf.choose = lambda memory, probe_logits=None: mixed[: len(memory.tokens)]
    x = images[: len(mixed)]
    with flop_counter() as counted:
        pred = clf.predict(x)
    analytic = (pred.flops - elementwise - actor).sum()
    # batched, the input-independent queries (the read's, through W_k when folded, and the write's) run once per
    # group rather than once per row: at most that much less, never more (no keys/values for rows that fold)
    d, t = cfg.embed_dim, cfg.token_dim
    independent = sum(2 * s.tokens * d * d + 2 * s.tokens * d * t * read_is_folded(cfg, s.tokens) + 2 * d * d
                      for s in pred.settings)  # fmt: skip
    assert analytic - independent <= counted.get_total_flops() <= analytic
    with torch.no_grad():
        for i, setting in enumerate(pred.settings):
            assert setting == clf.grid.setting(tuple(mixed[i]))
            alone = clf.backbone(x[i : i + 1], *setting)
            torch.testing.assert_close(pred.logits[i : i + 1], alone, atol=ATOL, rtol=ATOL)


def test_table_evaluation_equals_running_the_controller(staged_run) -> None:
    ev = staged_run["metrics"]
    clf = AdaptiveClassifier.load(staged_run["run"])
    data = load_split("test").subset(100)
    pred = clf.predict(data.as_float())
    assert ev["accuracy"] == (pred.labels == data.labels).sum().item() / 100
    assert ev["mean_flops"] == pytest.approx(float(pred.flops.mean()), rel=1e-12)
