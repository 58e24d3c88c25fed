"""The read-attention diagnostic computes the attention the model really uses, and its summaries are right."""

from __future__ import annotations

import math

import pytest
import torch

from backbone import create_model
from backbone.layers.attention import _merge_heads
from backbone.read_attention import main, read_attention, read_attention_stats


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = create_model("adaperceiver_test", patch_context_kernel=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))  # sharpen the attention away from uniform
    return m


def test_weights_reproduce_the_read(model, square_images) -> None:
    x = square_images(3, 0).as_float()
    attn = read_attention(model, x)
    assert attn.shape == (3, model.cfg.num_heads, model.cfg.max_tokens, model.cfg.num_patches)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    with torch.no_grad():
        memory = model.embed(x)
        rebuilt = model.latent + model.read.proj(_merge_heads(attn @ model.read_keys_values(memory)[1]))
        torch.testing.assert_close(rebuilt, model.read_latents(memory, model.cfg.max_tokens), atol=1e-5, rtol=1e-5)


def test_constant_queries_give_uniform_attention(model, square_images) -> None:
    with torch.no_grad():
        model.read.q.weight.zero_()
        model.read.q.bias.zero_()
    stats = read_attention_stats(model, square_images(4, 0).as_float(), num_tokens=4)
    p = model.cfg.num_patches
    assert stats.uniform_entropy == pytest.approx(math.log(p))
    assert stats.entropy == pytest.approx([math.log(p)] * model.cfg.num_heads, abs=1e-5)
    assert stats.top1_weight == pytest.approx([1 / p] * model.cfg.num_heads, abs=1e-6)
    assert stats.latent_map_cosine == pytest.approx([1.0] * model.cfg.num_heads, abs=1e-5)


def test_sharp_attention_has_lower_entropy(model, square_images) -> None:
    stats = read_attention_stats(model, square_images(4, 0).as_float())
    assert all(e < stats.uniform_entropy - 0.05 for e in stats.entropy)
    assert all(t > 1.5 / model.cfg.num_patches for t in stats.top1_weight)


@pytest.mark.parametrize("num_tokens", [None, 4])
def test_stats_equal_a_loop_over_the_attention_rows(model, square_images, num_tokens) -> None:
    """Entropy, top-1 weight and latent-map cosine recomputed row by row in plain Python from the weights."""
    x = square_images(3, 1).as_float()
    attn = read_attention(model, x, num_tokens).double()
    stats = read_attention_stats(model, x, num_tokens)
    b, heads, g, p = attn.shape
    assert (stats.num_tokens, stats.num_patches, stats.samples) == (g, p, b)
    for h in range(heads):
        rows = [attn[i, h, j].tolist() for i in range(b) for j in range(g)]
        entropy = sum(-sum(w * math.log(w) for w in row if w > 0) for row in rows) / len(rows)
        top1 = sum(max(row) for row in rows) / len(rows)
        maps = [[sum(attn[i, h, j, q].item() for i in range(b)) / b for q in range(p)] for j in range(g)]
        cosines = [
            sum(u * v for u, v in zip(maps[j1], maps[j2], strict=True))
            / math.sqrt(sum(u * u for u in maps[j1]) * sum(v * v for v in maps[j2]))
            for j1 in range(g)
            for j2 in range(g)
            if j1 != j2
        ]
        assert stats.entropy[h] == pytest.approx(entropy, abs=1e-5), h
        assert stats.top1_weight[h] == pytest.approx(top1, abs=1e-6), h
        assert stats.latent_map_cosine[h] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5), h


def test_cli_rejects_an_unknown_token_count(capsys) -> None:
    assert main(["--tokens", "5", "--samples", "8"]) == 2
    assert "num_tokens=5 is not a token granularity" in capsys.readouterr().err
