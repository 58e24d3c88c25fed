"""Tests for the AdaPerceiver backbone: nesting, width slicing vs masking, FLOPs, gradients, checkpoints, input
validation and the model registry (DESIGN §2-3).

Everything runs on the tiny ``adaperceiver_test`` size (28x28x1, 3 x 3 x 3 settings) except the FLOPs checks of
``adaperceiver_fmnist`` and the build of ``adaperceiver_in1k``. Run with ``OMP_NUM_THREADS=1``; the whole file takes
a few seconds.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from backbone import (
    MODEL_NAMES,
    AdaPerceiver,
    CheckpointError,
    PatchMemory,
    create_model,
    file_sha256,
    flops_breakdown,
    load_backbone,
    measure_flops,
    save_backbone,
)
from backbone.checkpoint import FORMAT, FORMAT_VERSION, METADATA_KEY
from backbone.flops import SHARED_PARTS, read_is_folded
from backbone.layers import MatryoshkaMlp, PatchContext
from backbone.layers.attention import TWO_KEY_MIN_ROWS, attention
from backbone.settings import Setting
from backbone.training import joint_loss

ATOL = 1e-5  # float32 tolerance for "the same computation, different kernels / masks"
RTOL = 1e-5


def _as_regex(values) -> str:
    """Regex matching ``str(list(values))`` literally, e.g. ``\\[2,\\ 4,\\ 8\\]``."""
    return re.escape(str(list(values)))


@pytest.fixture(scope="module")
def model() -> AdaPerceiver:
    """Tiny model in which every block matters.

    A fresh model has LayerScale 1e-5, so its blocks are near-identity and a nesting check would pass for almost
    any wiring. LayerScale 1.0 plus noise on *every* parameter (biases, norms, queries) makes each block, token and
    hidden unit change the output.
    """
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", ls_init_values=1.0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(5, 1, 28, 28)


# --- 1. nesting: one forward_all pass == every single setting ----------------------------------------------------


def test_every_setting_equals_forward_all(model: AdaPerceiver, images: torch.Tensor) -> None:
    cfg = model.cfg
    assert len(list(model.grid)) == 27 == np.prod(model.grid.shape)
    with torch.no_grad():
        all_logits = {w: model.forward_all(images, width=w) for w in cfg.widths}
        for logits in all_logits.values():
            assert logits.shape == (len(images), *model.grid.shape[:2], cfg.num_classes)
        for g, d, w, _ in model.grid:
            k = cfg.token_granularities.index(g)
            single = model(images, num_tokens=g, depth=d, width=w)
            assert single.shape == (len(images), cfg.num_classes)
            torch.testing.assert_close(single, all_logits[w][:, k, d - 1], atol=ATOL, rtol=RTOL)


def test_every_axis_changes_the_output(model: AdaPerceiver, images: torch.Tensor) -> None:
    """Guards the nesting test: if depth/tokens/width did not matter, equality above would prove nothing."""
    cfg = model.cfg
    with torch.no_grad():
        full = model.forward_all(images)  # (B, K, L, C) at full width
        small = model.forward_all(images, width=cfg.widths[0])
    gap = 100 * ATOL
    for k in range(model.grid.shape[0]):
        for d1 in range(cfg.depth):
            for d2 in range(d1 + 1, cfg.depth):
                assert (full[:, k, d1] - full[:, k, d2]).abs().max() > gap, f"depth {d1 + 1} == depth {d2 + 1}"
    for d in range(cfg.depth):
        for k1 in range(model.grid.shape[0]):
            for k2 in range(k1 + 1, model.grid.shape[0]):
                assert (full[:, k1, d] - full[:, k2, d]).abs().max() > gap, f"granularities {k1}, {k2} agree"
        assert (full[:, :, d] - small[:, :, d]).abs().max() > gap, "FFN width has no effect"
    # the logits depend on the image, not only on the setting
    assert (full[0] - full[1]).abs().max() > gap


def test_fewer_tokens_are_the_first_latents_of_more(model: AdaPerceiver, images: torch.Tensor) -> None:
    cfg = model.cfg
    grans = cfg.token_granularities
    with torch.no_grad():
        for d in range(1, cfg.depth + 1):
            for w in cfg.widths:
                feats = {g: model.forward_features(images, g, d, w) for g in grans}
                for g in grans:
                    assert feats[g].shape == (len(images), g, cfg.embed_dim)
                for i, g_small in enumerate(grans):
                    for g_big in grans[i + 1 :]:
                        torch.testing.assert_close(feats[g_small], feats[g_big][:, :g_small], atol=ATOL, rtol=RTOL)
                        # and the later latents are not a copy of the earlier ones (RoPE tells them apart)
                        assert (feats[g_big][:, g_small:] - feats[g_big][:, :1]).abs().max() > 100 * ATOL


def test_patch_memory_is_shared_by_every_setting(model: AdaPerceiver, images: torch.Tensor) -> None:
    with torch.no_grad():
        memory = model.embed(images)
        assert isinstance(memory, PatchMemory)
        assert memory.tokens.shape == (len(images), model.cfg.num_patches, model.cfg.embed_dim)
        for g, d, w in [(2, 1, 8), (4, 2, 16), (8, 3, 32)]:
            torch.testing.assert_close(model(memory, g, d, w), model(images, g, d, w), atol=0, rtol=0)
        torch.testing.assert_close(model.forward_all(memory), model.forward_all(images), atol=0, rtol=0)
        # rows of a PatchMemory run the matching rows of the batch
        torch.testing.assert_close(model(memory[1:3], 4, 2, 16), model(images[1:3], 4, 2, 16), atol=ATOL, rtol=RTOL)


# --- 2. one width per batch (sliced) == per-sample widths (grouped) == DESIGN's masking ---------------------------


def test_sliced_width_equals_masked_width(model: AdaPerceiver, images: torch.Tensor) -> None:
    b = len(images)
    with torch.no_grad():
        for g, d, w, _ in model.grid:
            sliced = model(images, num_tokens=g, depth=d, width=w)
            torch.testing.assert_close(model(images, g, d, [w] * b), sliced, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(model(images, g, d, torch.full((b,), w)), sliced, atol=ATOL, rtol=RTOL)


def test_mixed_per_sample_widths_equal_separate_runs(model: AdaPerceiver, images: torch.Tensor) -> None:
    widths = [8, 32, 16, 8, 32]
    with torch.no_grad():
        for g, d in [(2, 1), (4, 2), (8, 3)]:
            mixed = model(images, num_tokens=g, depth=d, width=widths)
            for i, w in enumerate(widths):
                alone = model(images[i : i + 1], num_tokens=g, depth=d, width=w)
                torch.testing.assert_close(mixed[i : i + 1], alone, atol=ATOL, rtol=RTOL)
        mixed_all = model.forward_all(images, width=torch.tensor(widths))
        for i, w in enumerate(widths):
            torch.testing.assert_close(mixed_all[i : i + 1], model.forward_all(images[i : i + 1], width=w), atol=ATOL,
                                       rtol=RTOL)  # fmt: skip


def _masked_mlp(mlp: MatryoshkaMlp, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """DESIGN §2's training recipe, written out: full-width MLP, hidden units past each sample's size zeroed."""
    y = mlp.act(mlp.fc1(x))
    keep = torch.arange(y.shape[-1])[None, :] < hidden[:, None]
    return mlp.fc2(y * keep[:, None, :].to(y.dtype))


@pytest.mark.parametrize("order", ["unsorted", "sorted"])
def test_grouped_per_sample_widths_equal_masking_with_gradients(order: str) -> None:
    """Training groups samples by width and slices (cheaper); output *and* every gradient equal masking's."""
    torch.manual_seed(0)
    mlp = MatryoshkaMlp(8, 32)
    hidden = torch.tensor([16, 32, 8, 16, 8, 32, 32])
    hidden = hidden.sort().values if order == "sorted" else hidden  # sorted: contiguous groups, no gather/scatter
    x = torch.randn(len(hidden), 3, 8)
    results = []
    for forward in (lambda a: mlp(a, hidden), lambda a: _masked_mlp(mlp, a, hidden)):
        mlp.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = forward(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out, xi.grad] + [p.grad.clone() for p in mlp.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="per-sample hidden sizes need shape"):
        mlp(x, hidden[:3])


@pytest.mark.parametrize("name", ["adaperceiver_test", "adaperceiver_fmnist"])
def test_masked_hidden_units_match_sliced_for_shipped_sizes(name: str) -> None:
    m = create_model(name)
    widths = m.cfg.widths
    masked = m._hidden(torch.tensor(widths), len(widths)).tolist()
    assert masked == [m.cfg.hidden_dim(w) for w in widths]


def test_masked_width_equals_sliced_for_non_integer_ffn_ratio() -> None:
    """ffn_ratio=2.6, width 45: the sliced path uses int(45 * 2.6) = 117 hidden units, the masked path 116."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", embed_dim=64, widths=(45, 64), ffn_ratio=2.6, ls_init_values=1.0).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(m(x, width=[45, 45]), m(x, width=45), atol=ATOL, rtol=RTOL)


# --- 3. analytic FLOPs == FlopCounterMode ------------------------------------------------------------------------


def _assert_flops_match(m: AdaPerceiver, setting: tuple[int, ...]) -> None:
    g, d, w, stage = Setting(*setting)
    analytic = m.flops(g, d, w, stage)
    assert isinstance(analytic, int) and analytic > 0
    measured = measure_flops(m, torch.rand(1, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size), num_tokens=g,
                             depth=d, width=w, stage=stage)  # fmt: skip
    assert abs(analytic - measured) <= 0.01 * measured, f"{setting}: analytic {analytic} vs measured {measured}"


def test_flops_match_counter_on_every_test_setting(model: AdaPerceiver) -> None:
    for setting in list(model.grid):
        _assert_flops_match(model, setting)


FMNIST_SAMPLE = [(4, 1, 32), (4, 8, 128), (8, 2, 64), (8, 5, 32), (16, 3, 128), (16, 7, 64), (32, 1, 32), (32, 8, 128)]


@pytest.fixture(scope="module")
def fmnist() -> AdaPerceiver:
    torch.manual_seed(0)
    return create_model("adaperceiver_fmnist").eval()


@pytest.mark.parametrize("setting", FMNIST_SAMPLE, ids=lambda s: "g{}-d{}-w{}".format(*s))
def test_flops_match_counter_on_fmnist_sample(fmnist: AdaPerceiver, setting: tuple[int, int, int]) -> None:
    _assert_flops_match(fmnist, setting)


def test_fmnist_compute_range(fmnist: AdaPerceiver) -> None:
    cfg = fmnist.cfg
    full = fmnist.flops()
    assert full == fmnist.flops(cfg.max_tokens, cfg.depth, cfg.widths[-1])
    smallest = fmnist.flops(cfg.token_granularities[0], 1, cfg.widths[0])
    all_flops = [fmnist.flops(*s) for s in list(fmnist.grid)]
    assert max(all_flops) == full and min(all_flops) == smallest
    assert 50e6 <= full <= 120e6, f"full setting {full / 1e6:.1f} MFLOPs"
    assert full / smallest >= 15, f"full / smallest = {full / smallest:.1f}, the spec asks for about 20x"


def test_flops_grow_along_every_axis(fmnist: AdaPerceiver) -> None:
    c = fmnist.cfg
    for g, d, w, _ in fmnist.grid:
        f = fmnist.flops(g, d, w)
        if d < c.depth:
            assert fmnist.flops(g, d + 1, w) > f
        if w != c.widths[-1]:
            assert fmnist.flops(g, d, c.widths[c.widths.index(w) + 1]) > f
        if g != c.max_tokens:
            assert fmnist.flops(c.token_granularities[c.token_granularities.index(g) + 1], d, w) > f


def test_flops_breakdown_sums_and_shared_parts(fmnist: AdaPerceiver) -> None:
    parts = flops_breakdown(fmnist.cfg, 8, 3, 64)
    assert sum(parts.values()) == fmnist.flops(8, 3, 64)
    assert set(SHARED_PARTS) <= set(parts)
    # the shared parts do not depend on the setting, among settings whose read projects the patch keys/values
    other, wide = flops_breakdown(fmnist.cfg, 32, 8, 128), flops_breakdown(fmnist.cfg, 16, 1, 16)
    assert not read_is_folded(fmnist.cfg, 32) and not read_is_folded(fmnist.cfg, 16)
    assert all(wide[p] == other[p] for p in SHARED_PARTS)
    assert read_is_folded(fmnist.cfg, 8) and parts["read_kv"] == 0 < other["read_kv"]  # a folded read has none


@pytest.mark.parametrize("name", ["adaperceiver_fmnist_stages", "adaperceiver_in1k"])
def test_read_is_folded_exactly_where_it_is_cheaper(name: str) -> None:
    """Folding pays while heads x latents is small against the embedding width; every granularity up to some
    size folds and none after it (fmnist: 2, 4, 8 of 32; the ImageNet model: 32 of 256)."""
    cfg = create_model(name).cfg
    folded = [read_is_folded(cfg, g) for g in cfg.token_granularities]
    assert folded[0] and not folded[-1] and folded == sorted(folded, reverse=True)
    for g, f in zip(cfg.token_granularities, folded, strict=True):
        projected = 4 * cfg.num_patches * cfg.token_dim * cfg.embed_dim + 4 * g * cfg.num_patches * cfg.embed_dim
        fold = 4 * cfg.num_heads * g * cfg.num_patches * cfg.token_dim + 4 * g * cfg.embed_dim * cfg.token_dim
        assert f == (fold < projected)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_folded_read_equals_the_projected_read(qkv_bias: bool) -> None:
    """``attend_folded`` is ``attend`` over the projected keys/values, biases included, for any number of queries."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", qkv_bias=qkv_bias).eval()
    for p in m.read.parameters():  # non-trivial norms and biases, so dropping or misplacing a term would show
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randn(5, m.cfg.num_patches, m.cfg.token_dim)
    with torch.no_grad():
        for g in (1, 3, m.cfg.max_tokens):
            q = m.read.project_q(torch.randn(1, g, m.cfg.embed_dim), m.rope)
            k, v = m.read.project_kv(tokens)
            want = m.read.attend(q.expand(5, -1, -1, -1), k, v)
            torch.testing.assert_close(m.read.attend_folded(q, tokens), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cannot be folded"):
            m.write.attend_folded(q, torch.randn(5, 4, m.cfg.embed_dim))


def test_two_key_attention_in_closed_form_equals_the_library_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over two keys, with grad off and enough rows, ``attention`` answers without the library kernel (which is made
    to raise) and equals it: self-attention's strided q/k/v and the write-out's one expanded query."""
    torch.manual_seed(0)
    qkv = torch.randn(40, 2, 3, 8, 16).permute(2, 0, 3, 1, 4)  # SelfAttention's layout: (3, B, heads, 2, head_dim)
    query = torch.randn(1, 8, 1, 16).expand(40, -1, -1, -1)
    cases = [(qkv[0], qkv[1], qkv[2]), (query, qkv[1], qkv[2])]
    want = [F.scaled_dot_product_attention(*c) for c in cases]

    def library_kernel(*args, **kwargs):
        raise AssertionError("the closed form was not taken")

    monkeypatch.setattr(F, "scaled_dot_product_attention", library_kernel)
    with torch.no_grad():
        for case, expected in zip(cases, want, strict=True):
            torch.testing.assert_close(attention(*case), expected, atol=1e-6, rtol=1e-5)
        with pytest.raises(AssertionError, match="not taken"):  # three keys, a mask, too few rows: the library's
            attention(qkv[0], *(torch.cat((t, t[:, :, :1]), 2) for t in qkv[1:]))
        with pytest.raises(AssertionError, match="not taken"):
            attention(*cases[0], torch.ones(2, 2, dtype=torch.bool))
        with pytest.raises(AssertionError, match="not taken"):
            attention(*(t[: TWO_KEY_MIN_ROWS // 16 - 1] for t in cases[0]))
    with pytest.raises(AssertionError, match="not taken"):  # grad on (training): the library kernel and its backward
        attention(*cases[0])


def test_flops_match_counter_with_patch_context() -> None:
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", patch_context_kernel=3).eval()
    for setting in [m.grid.smallest, m.grid.full]:
        _assert_flops_match(m, setting)
    assert m.flops() - create_model("adaperceiver_test").flops() == 2 * m.cfg.num_patches * m.cfg.embed_dim * 9


def test_patch_context_mixes_only_neighbouring_patches() -> None:
    """Changing one patch token changes the tokens of its k x k neighbourhood and no other (residual + depthwise)."""
    torch.manual_seed(0)
    ctx = PatchContext(dim=8, grid_size=5, kernel_size=3)
    tokens = torch.randn(2, 25, 8)
    bumped = tokens.clone()
    bumped[:, 2 * 5 + 1] += 1.0  # row 2, column 1 of the 5x5 grid
    with torch.no_grad():
        changed = (ctx(bumped) - ctx(tokens)).abs().amax(dim=(0, 2)).view(5, 5) > 1e-6
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[1:4, 0:3] = True
    assert torch.equal(changed, expected)
    with torch.no_grad():
        ctx.conv.weight.zero_()
        ctx.conv.bias.zero_()
    torch.testing.assert_close(ctx(tokens), tokens)  # a zero convolution leaves the tokens as they are


def test_patch_context_equals_the_nchw_formula_with_gradients_and_leaves_its_input_alone() -> None:
    """The channels-last view and the in-place residual are layout tricks only: output and gradients equal
    ``tokens + depthwise_conv(grid)`` computed on an explicit NCHW grid, and the input tokens are not modified."""
    torch.manual_seed(0)
    ctx = PatchContext(dim=8, grid_size=5, kernel_size=3)
    tokens = torch.randn(3, 25, 8, requires_grad=True)
    before = tokens.detach().clone()
    out = ctx(tokens)
    assert torch.equal(tokens.detach(), before)
    grid = tokens.transpose(1, 2).reshape(3, 8, 5, 5).contiguous()
    weight = ctx.conv.weight.contiguous()
    ref = tokens + F.conv2d(grid, weight, ctx.conv.bias, padding=1, groups=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, (tokens, ctx.conv.weight), upstream)
    want = torch.autograd.grad(ref, (tokens, ctx.conv.weight), upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_patch_context_runs_in_fp32_under_bf16_autocast() -> None:
    m = create_model("adaperceiver_test", patch_context_kernel=3)
    tokens = torch.randn(2, m.cfg.num_patches, m.cfg.embed_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.patch_context(tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, m.patch_context(tokens))


@pytest.mark.parametrize("kernel", [-1, 2, 4])
def test_bad_patch_context_kernel_is_refused(kernel: int) -> None:
    with pytest.raises(ValueError, match="patch_context_kernel must be 0"):
        create_model("adaperceiver_test", patch_context_kernel=kernel)


@pytest.mark.parametrize("dims, strides", [((8, 8), (2, 2)), ((8, 8, 8), (1, 2, 1)), ((8,), (4,))])
def test_conv_stem_strides_keep_the_patch_grid_and_flops_match(dims, strides) -> None:
    """Strided stem convs take over downsampling from the projection; the grid and the FLOPs count still agree."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=dims, stem_strides=strides).eval()
    x = torch.rand(2, 1, 28, 28)
    assert m.stem(x).shape == (2, m.cfg.num_patches, m.cfg.embed_dim)
    rest = 4 // math.prod(strides)
    assert m.stem.proj.kernel_size == (rest, rest) and m.stem.proj.stride == (rest, rest)
    for setting in [m.grid.smallest, m.grid.full]:
        _assert_flops_match(m, setting)


def test_conv_stem_flops_match_with_three_channels() -> None:
    """Every other conv-stem check has one input channel: the first conv's FLOPs must scale with ``in_chans``."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8, 8), in_chans=3,
                     mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)).eval()  # fmt: skip
    for setting in [m.grid.smallest, m.grid.full]:
        _assert_flops_match(m, setting)


def test_default_conv_stem_strides_are_two_then_one() -> None:
    implicit = create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8, 8))
    explicit = create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8, 8), stem_strides=(2, 1))
    assert implicit.cfg.conv_stem_strides == (2, 1)
    assert [c.stride for c in implicit.stem.convs if isinstance(c, torch.nn.Conv2d)] == [(2, 2), (1, 1)]
    assert implicit.flops() == explicit.flops()


@pytest.mark.parametrize("strides", [(2,), (2, 2, 2), (0, 2), (2, 3)])
def test_bad_conv_stem_strides_are_refused(strides) -> None:
    with pytest.raises(ValueError, match="stem_strides needs one positive stride per stem_dims entry"):
        create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8, 8), stem_strides=strides)


def test_narrow_patch_tokens_shrink_the_read_and_flops_match() -> None:
    """``patch_dim`` narrows the patch tokens; only the input adapter and the read's keys/values get cheaper."""
    torch.manual_seed(0)
    base = create_model("adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8,), patch_context_kernel=3)
    narrow = create_model(
        "adaperceiver_test", stem="conv", patch_size=4, stem_dims=(8,), patch_context_kernel=3, patch_dim=16
    ).eval()
    assert base.cfg.token_dim == base.cfg.embed_dim == 32 and narrow.cfg.token_dim == 16
    x = torch.rand(2, 1, 28, 28)
    memory = narrow.embed(x)
    assert memory.tokens.shape == (2, narrow.cfg.num_patches, 16)
    k, _ = narrow.read_keys_values(memory)
    assert k.shape[-1] * narrow.cfg.num_heads == narrow.cfg.embed_dim  # keys/values still have width D
    for setting in [narrow.grid.smallest, narrow.grid.full]:
        _assert_flops_match(narrow, setting)
    p, d, c, g, h = narrow.cfg.num_patches, narrow.cfg.embed_dim, narrow.cfg.stem_dims[-1], 8, narrow.cfg.num_heads
    assert read_is_folded(narrow.cfg, g) and read_is_folded(base.cfg, g)  # the full read's 8 latents fold
    read = 4 * h * g * p * (d - 16) + 4 * g * d * (d - 16)  # scores and weighted sums over tokens; W_k and W_v
    saved = read + 2 * p * c * 4 * (d - 16) + 2 * p * (d - 16) * 9  # the read, the projection, the context
    assert base.flops() - narrow.flops() == saved


def test_negative_patch_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="patch_dim must be 0"):
        create_model("adaperceiver_test", patch_dim=-1)


# --- 4. joint-training gradients -----------------------------------------------------------------------------------


def test_joint_loss_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    m = create_model("adaperceiver_test").train()  # the default init, as in training
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, m.cfg.num_classes, (6,))
    widths = torch.tensor([8, 16, 32, 8, 16, 32])  # every width in play, so every hidden unit is used
    logits = m.forward_all(x, width=widths)
    assert logits.shape == (6, 3, 3, m.cfg.num_classes)
    loss = joint_loss(logits, y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    names = [n for n, _ in m.named_parameters()]
    assert len(names) > 20
    for name, p in m.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert p.grad.shape == p.shape
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_joint_loss_weights_depths() -> None:
    """Loss = mean over granularities of sum_l l * CE(k, l) / sum_l l."""
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 3, 5)
    y = torch.randint(0, 5, (4,))
    ce = torch.stack([torch.stack([torch.nn.functional.cross_entropy(logits[:, k, d], y) for d in range(3)])
                      for k in range(2)])  # fmt: skip
    expected = (ce.mean(0) * torch.tensor([1.0, 2.0, 3.0])).sum() / 6
    torch.testing.assert_close(joint_loss(logits, y), expected)


# --- 5. checkpoints --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(model: AdaPerceiver, images: torch.Tensor, tmp_path) -> None:
    path = tmp_path / "sub" / "backbone.safetensors"
    sha = save_backbone(model, path, {"note": "test", "epochs": 3})
    assert sha == file_sha256(path) and re.fullmatch(r"[0-9a-f]{64}", sha)
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temporary file left behind"
    loaded = load_backbone(path)
    assert isinstance(loaded, AdaPerceiver)
    assert loaded.cfg == model.cfg
    assert loaded.checkpoint_sha256 == sha
    assert loaded.checkpoint_info == {"note": "test", "epochs": 3}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        for setting in [(2, 1, 8), (8, 3, 32)]:
            torch.testing.assert_close(loaded(images, *setting), model(images, *setting), atol=0, rtol=0)
        torch.testing.assert_close(loaded.forward_all(images), model.forward_all(images), atol=0, rtol=0)
    # Re-saving the same weights gives the same tensors, but not necessarily the same sha256: safetensors writes
    # the metadata map in random (Rust HashMap) order. The sha256 identifies a file, not a set of weights.
    save_backbone(model, tmp_path / "again.safetensors")
    again = load_backbone(tmp_path / "again.safetensors").state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(again[key], value), key


def test_truncated_checkpoint_is_refused(model: AdaPerceiver, tmp_path) -> None:
    path = tmp_path / "full.safetensors"
    save_backbone(model, path)
    data = path.read_bytes()
    for name, size in [("half", len(data) // 2), ("header", 5), ("empty", 0)]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
            load_backbone(bad)


def test_foreign_safetensors_is_refused(tmp_path) -> None:
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"author": "someone"})
    with pytest.raises(CheckpointError, match=r"not an AdaPerceiver backbone checkpoint"):
        load_backbone(path)


def test_missing_checkpoint_is_refused(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"not found: .*nothing\.safetensors"):
        load_backbone(tmp_path / "nothing.safetensors")
    assert issubclass(CheckpointError, ValueError)


def _write_raw(path, tensors: dict[str, torch.Tensor], cfg_json: str) -> None:
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.loads(cfg_json), "info": {}}
    meta = {METADATA_KEY: json.dumps(header)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def test_checkpoint_with_missing_or_extra_tensors_is_refused(model: AdaPerceiver, tmp_path) -> None:
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("head.")}
    _write_raw(tmp_path / "missing.safetensors", missing, model.cfg.to_json())
    with pytest.raises(CheckpointError, match=r"does not match its config: missing \['head\.bias', 'head\.weight'\]"):
        load_backbone(tmp_path / "missing.safetensors")
    extra = {**state, "blocks.3.norm1.weight": torch.ones(32)}
    _write_raw(tmp_path / "extra.safetensors", extra, model.cfg.to_json())
    with pytest.raises(CheckpointError, match=r"unexpected \['blocks\.3\.norm1\.weight'\]"):
        load_backbone(tmp_path / "extra.safetensors")


def test_checkpoint_with_wrong_tensor_shapes_is_refused(model: AdaPerceiver, tmp_path) -> None:
    """Same keys, wider model: refused."""
    wider = create_model("adaperceiver_test", embed_dim=64, widths=(16, 32, 64))
    _write_raw(tmp_path / "shape.safetensors", wider.state_dict(), model.cfg.to_json())
    with pytest.raises(CheckpointError, match=r"does not match"):
        load_backbone(tmp_path / "shape.safetensors")


def test_checkpoint_with_wrong_tensor_shapes_raises_checkpoint_error(model: AdaPerceiver, tmp_path) -> None:
    wider = create_model("adaperceiver_test", embed_dim=64, widths=(16, 32, 64))
    _write_raw(tmp_path / "shape.safetensors", wider.state_dict(), model.cfg.to_json())
    with pytest.raises(CheckpointError):
        load_backbone(tmp_path / "shape.safetensors")


# --- 6. input validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_tokens=3), r"num_tokens=3 .*choose one of " + _as_regex((2, 4, 8))),
        (dict(num_tokens=16), r"num_tokens=16 .*choose one of " + _as_regex((2, 4, 8))),
        (dict(depth=0), r"depth=0 is outside 1\.\.3"),
        (dict(depth=4), r"depth=4 is outside 1\.\.3"),
        (dict(width=12), r"width \[12\] .*choose from " + _as_regex((8, 16, 32))),
        (dict(width=[8, 12, 16, 8, 64]), r"width \[12, 64\] .*choose from " + _as_regex((8, 16, 32))),
        (dict(width=[8, 16]), r"per-sample width needs 5 values"),
    ],
    ids=["tokens-3", "tokens-16", "depth-0", "depth-L+1", "width-12", "width-list", "width-length"],
)
def test_bad_setting_names_valid_choices(model: AdaPerceiver, images: torch.Tensor, kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(images, **kwargs)


def test_bad_setting_in_forward_all_and_flops(model: AdaPerceiver, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"choose from " + _as_regex((8, 16, 32))):
        model.forward_all(images, width=24)
    with pytest.raises(ValueError, match=r"choose one of " + _as_regex((2, 4, 8))):
        model.flops(num_tokens=5)
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        model.flops(depth=0)
    with pytest.raises(ValueError, match=r"one width"):
        model.flops(width=[8, 16])


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.rand(2, 3, 28, 28), r"expected 1 channel\(s\) \(B, 1, 28, 28\), got 3"),
        (torch.rand(1, 28, 28), r"4-D image batch \(B, 1, 28, 28\), got shape \(1, 28, 28\)"),
        (torch.rand(2, 1, 1, 28, 28), r"4-D image batch \(B, 1, 28, 28\)"),
        (torch.rand(2, 1, 32, 32), r"size \(B, 1, 28, 28\), got shape \(2, 1, 32, 32\)"),
        (torch.full((2, 1, 28, 28), float("nan")), r"NaN"),
        (torch.tensor([0.0, float("inf")]).repeat(392).view(1, 1, 28, 28), r"NaN or infinite"),
        (torch.rand(0, 1, 28, 28), r"empty batch"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), r"float images scaled to \[0, 1\], got dtype torch\.uint8"),
        (torch.rand(2, 1, 28, 28) * 255, r"scaled to \[0, 1\], got values in \[.*\] \(0-255 pixels: divide by 255"),
        (torch.rand(2, 1, 28, 28) - 0.5, r"scaled to \[0, 1\], got values in \[-0\.\d+"),  # mean/std applied
    ],
    ids=["channels", "3-D", "5-D", "size", "nan", "inf", "empty", "uint8", "0-255", "normalised"],
)
def test_bad_input_is_refused(model: AdaPerceiver, x: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(x)
    with pytest.raises(ValueError, match=match):
        model.forward_all(x)


def test_nan_in_one_image_is_refused(model: AdaPerceiver, images: torch.Tensor) -> None:
    x = images.clone()
    x[3, 0, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN"):
        model.embed(x)


def test_numpy_integer_settings_are_accepted(model: AdaPerceiver, images: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(images, num_tokens=4, depth=2, width=16)
        got = model(images, num_tokens=np.int64(4), depth=np.int64(2), width=np.int64(16))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert model.flops(np.int64(4), np.int64(2), np.int64(16)) == model.flops(4, 2, 16)


# --- 7. registry ---------------------------------------------------------------------------------------------------


def test_timm_registry() -> None:
    assert set(MODEL_NAMES) == {"adaperceiver_test", "adaperceiver_test_stages", "adaperceiver_fmnist",
                                "adaperceiver_fmnist_stages", "adaperceiver_in1k"}  # fmt: skip
    assert set(MODEL_NAMES) <= set(timm.list_models("adaperceiver*"))
    m = timm.create_model("adaperceiver_test")
    assert isinstance(m, AdaPerceiver)
    assert m.cfg.name == "adaperceiver_test"
    assert m.cfg == create_model("adaperceiver_test").cfg
    # overrides go through timm too
    assert timm.create_model("adaperceiver_test", num_classes=7).head.out_features == 7
    with pytest.raises(ValueError, match=r"no weights are downloaded"):
        timm.create_model("adaperceiver_test", pretrained=True)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*adaperceiver_test.*adaperceiver_fmnist"):
        create_model("nope")
    with pytest.raises((TypeError, ValueError), match=r"nope"):
        create_model("adaperceiver_test", nope=1)


def test_unknown_override_lists_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown AdaPerceiverConfig fields \['nope'\]; valid fields: .*embed_dim"):
        create_model("adaperceiver_test", nope=1)


def test_in1k_shape() -> None:
    m = create_model("adaperceiver_in1k")
    c = m.cfg
    assert (c.embed_dim, c.num_heads, c.depth) == (832, 13, 21)
    assert c.token_granularities == (32, 64, 96, 128, 192, 256)
    assert c.widths == (416, 624, 832)
    assert (c.img_size, c.in_chans, c.patch_size, c.num_patches, c.num_classes) == (224, 3, 16, 196, 1000)
    assert len(m.blocks) == 21 and m.head.out_features == 1000
    assert m.blocks[0].mlp.fc1.out_features == c.hidden_dim(832) == int(832 * 2.57)
    assert len(list(m.grid)) == 6 * 21 * 3
    full = m.flops()
    for setting in [(32, 1, 416), (64, 2, 624)]:  # the analytic count holds at ImageNet size too (3 channels, 224 px)
        _assert_flops_match(m, setting)
    assert full == max(m.flops(*s) for s in [(256, 21, 832), (32, 1, 416), (128, 10, 624)])
    # masked training width must use the same hidden units as sliced inference for this size too
    assert m._hidden(torch.tensor(c.widths), 3).tolist() == [c.hidden_dim(w) for w in c.widths]


def test_forward_blocks_continues_a_run() -> None:
    """Running blocks in two pieces (as early exit and probe reuse do) equals running them in one go."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", ls_init_values=1.0).eval()
    x = torch.rand(3, 1, 28, 28)
    g, w = m.cfg.token_granularities[1], m.cfg.widths[0]
    with torch.no_grad():
        z = m.read_latents(m.embed(x), g)
        whole = m.forward_blocks(z, 0, m.cfg.depth, w)
        pieces = m.forward_blocks(m.forward_blocks(z, 0, 1, w), 1, m.cfg.depth, w)
        torch.testing.assert_close(pieces, whole)
        torch.testing.assert_close(m.forward_head(whole), m(x, num_tokens=g, width=w))
    with pytest.raises(ValueError, match="start"):
        m.forward_blocks(z, 2, 1, w)


def test_block_with_mixed_widths_equals_each_row_at_its_width() -> None:
    """Rows of one batch at different sliced widths give what each row gives alone at its width."""
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", ls_init_values=1.0).eval()
    g, widths = m.cfg.token_granularities[-1], [m.cfg.widths[i] for i in (2, 0, 1, 0)]
    with torch.no_grad():
        z = m.read_latents(m.embed(torch.rand(4, 1, 28, 28)), g)
        mixed = m.forward_block_mixed_widths(z, 1, widths)
        for i, w in enumerate(widths):
            torch.testing.assert_close(mixed[i : i + 1], m.forward_blocks(z[i : i + 1], 1, 2, w))
    with pytest.raises(ValueError, match="FFN width"):
        m.forward_block_mixed_widths(z, 1, [3, 3, 3, 3])
    with pytest.raises(ValueError, match="one width per row"):
        m.forward_block_mixed_widths(z, 1, widths[:2])
