"""policy.aot_batch1: the AOT-compiled batch-1 paths give eager inference's settings, FLOPs and predictions.

A tiny stem-exit backbone (with the patch context) compiled without autotuning: each package takes seconds, so the
tests compile only what they check (two fronts, two settings, the full setting), in one cache folder per module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import nn

from backbone import create_model
from envs import get_observation
from policy.adaptive import AdaptiveClassifier
from policy.aot_batch1 import (
    TAP_WEIGHT,
    AotBatch1,
    _batch1_form,
    _dense_by_rolls,
    _depthwise_by_rolls,
    _export_forms,
    _patchify_linear,
)
from policy.cascade import ProbeCascade


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("adaperceiver_test_stages", patch_context_kernel=3, ls_init_values=1.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # enough for the probe confidences to spread (0.36-0.68 here)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aot")


def _cascade(model, images) -> AdaptiveClassifier:
    """A probe cascade that answers half the images with the probe and sends the rest to a deeper stage. Its
    threshold lies midway between two images' probe confidences, far from both: compiled and eager confidences
    differ by float rounding, so an image right at the threshold could go either way."""
    grid = model.grid
    probe = tuple(int(i) for i in grid.smallest_index)
    deeper = (len(grid.stages) - 1, 0, 1, 0)  # the deepest stage, 2 blocks: the stem continues, a fresh read
    with torch.no_grad():
        top1 = AdaptiveClassifier(model, ProbeCascade(2.0, deeper, probe), "probe").spec.compute(model, model.embed(
            images, grid.smallest.stage))[:, 0].sort().values  # fmt: skip
    half = len(top1) // 2
    assert top1[half] - top1[half - 1] > 1e-4  # a clear gap to put the threshold in (true for these images)
    return AdaptiveClassifier(model, ProbeCascade(float(top1[half - 1] + top1[half]) / 2, deeper, probe), "probe")


def _ppo(model) -> AdaptiveClassifier:
    """An untrained SB3 actor whose action head always picks the probe's stage, tokens and width at depth 2: the
    setting that goes on from the probe's latents (the front's argmax is the one compiled)."""
    spec = get_observation("pooled_probe")
    policy = ActorCriticPolicy(
        spaces.Box(spec.low(model), spec.high(model), dtype=np.float32),
        spaces.MultiDiscrete(list(model.grid.shape)),
        lambda _: 1e-3,
        net_arch=[8],
    )
    target = [0, 0, 1, 0]
    with torch.no_grad():
        policy.action_net.weight.zero_()
        policy.action_net.bias.copy_(torch.cat([10.0 * nn.functional.one_hot(torch.tensor(t), n)
                                                for t, n in zip(target, model.grid.shape, strict=True)]))  # fmt: skip
    return AdaptiveClassifier(model, policy.eval(), "pooled_probe")


def _check_against_eager(clf: AdaptiveClassifier, aot: AotBatch1, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        eager = clf.predict(images)
        got = [aot.predict(x) for x in images]
    actions = np.concatenate([g.actions for g in got])
    assert (actions == eager.actions).all()
    assert [s for g in got for s in g.settings] == eager.settings
    assert np.array_equal(np.concatenate([g.flops for g in got]), eager.flops)
    logits = torch.cat([g.logits for g in got])
    assert torch.allclose(logits, eager.logits, atol=1e-4), (logits - eager.logits).abs().max()
    assert torch.equal(torch.cat([g.labels for g in got]), eager.labels)
    return actions


def test_compiled_cascade_equals_eager_and_is_reused_from_the_cache(model, images, cache) -> None:
    clf = _cascade(model, images)
    compiled: list[str] = []
    aot = AotBatch1(clf, cache, on_compile=compiled.append, max_autotune=False)
    actions = _check_against_eager(clf, aot, images)
    probe = (actions == np.array(clf.policy.probe)).all(1)
    assert 0 < probe.sum() < len(images)  # both branches ran: the probe's answer and the deeper stage
    assert compiled == ["front", "setting_" + "_".join(map(str, clf.policy.setting))]
    with torch.inference_mode():
        full = torch.cat([aot.full(x) for x in images[:3]])
        assert torch.allclose(full, model(images[:3]), atol=1e-4)
        again = AotBatch1(clf, cache, on_compile=compiled.append, max_autotune=False)  # a new process, say
        assert torch.equal(again.predict(images[0]).logits, aot.predict(images[0]).logits)
        nan = images[0].clone()
        nan[0, 3, 3] = float("nan")
        for bad, message in ((nan, "NaN"), (images[0] * 255, r"scaled to \[0, 1\]"), (images[0].double(), "float32")):
            for path in (aot.predict, aot.full, aot.front):  # once compiled, the pixels are checked inside the paths
                with pytest.raises(ValueError, match=message):
                    path(bad)
    assert compiled[-1] == "full" and len(compiled) == 3  # nothing compiled twice


def test_compiled_ppo_front_and_a_setting_going_on_from_the_probe_equal_eager(model, images, cache) -> None:
    clf = _ppo(model)
    compiled: list[str] = []
    actions = _check_against_eager(clf, AotBatch1(clf, cache, on_compile=compiled.append, max_autotune=False), images)
    assert (actions == [0, 0, 1, 0]).all() and clf.continues_probe[0, 0, 1, 0]
    assert compiled == ["front", "setting_0_0_1_0"]


def test_bad_images_are_refused_before_anything_compiles(model, images, tmp_path) -> None:
    compiled: list[str] = []
    aot = AotBatch1(_cascade(model, images), tmp_path, on_compile=compiled.append, max_autotune=False)
    nan = images[0].clone()
    nan[0, 3, 3] = float("nan")
    bad_images = (nan, images[:2], images[0, :, :20], images[0] * 255, images[0].double())
    for bad, message in zip(bad_images, ("NaN", "one image", "one image", "scaled to", "float32"), strict=True):
        with pytest.raises(ValueError, match=message):
            aot.predict(bad)
    assert compiled == [] and not any(tmp_path.iterdir())


def test_batch1_forms_equal_the_convolutions_and_are_undone(model) -> None:
    """Every convolution's batch-1 form (the patch embedding as a matmul; the 3x3 stem convolutions, one input
    channel and more, stride 1 and 2, and the patch context's depthwise one from rolled taps) equals the
    convolution, borders included; other convolutions keep theirs; exporting leaves the model as it was."""
    torch.manual_seed(2)
    patch = model.stem.exits[0]
    depthwise = model.patch_context.conv
    first, strided = model.stem.convs[0], model.stem.convs[2]  # 1 -> 8 channels, stride 1; 8 -> 16, stride 2
    assert _batch1_form(patch) is _patchify_linear and _batch1_form(depthwise) is _depthwise_by_rolls
    assert _batch1_form(first) is _dense_by_rolls and _batch1_form(strided) is _dense_by_rolls
    assert _batch1_form(nn.Conv2d(4, 4, 3, padding=0)) is None and _batch1_form(nn.Conv2d(4, 4, 2, padding=1)) is None
    with torch.no_grad():
        x = torch.rand(3, 1, 28, 28)
        assert torch.allclose(_patchify_linear(patch, x), patch(x), atol=1e-5)
        assert torch.allclose(_dense_by_rolls(first, x), first(x), atol=1e-5)
        h = torch.randn(3, strided.in_channels, 28, 28)
        assert torch.allclose(_dense_by_rolls(strided, h), strided(h), atol=1e-5)
        odd = nn.Conv2d(3, 5, 5, stride=2, padding=2)  # 5x5 taps, an odd input side
        h = torch.randn(2, 3, 9, 11)
        assert torch.allclose(_dense_by_rolls(odd, h), odd(h), atol=1e-5)
        grid = torch.randn(3, depthwise.in_channels, 7, 7)
        assert torch.allclose(_depthwise_by_rolls(depthwise, grid), depthwise(grid), atol=1e-5)
        before = model(x)
        with _export_forms(model):
            assert torch.allclose(model(x), before, atol=1e-5)
            model.check_input(torch.full((1, 1, 28, 28), float("nan")))  # left out while exporting
        assert not any(TAP_WEIGHT in c._buffers for c in (first, strided, depthwise))
        assert not any("forward" in vars(c) for c in (patch, first, strided, depthwise))
        assert "check_input" not in vars(model)
        with pytest.raises(ValueError, match="NaN"):
            model.check_input(torch.full((1, 1, 28, 28), float("nan")))
