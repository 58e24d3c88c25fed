"""``backbone.deepen_stem``: one more stem convolution as a new deepest stage, every old setting unchanged."""

from __future__ import annotations

import pytest
import torch

from backbone import create_model, load_backbone, measure_flops, save_backbone
from backbone.checkpoint import read_metadata
from backbone.deepen_stem import deepen_stem, main
from backbone.finetune import init_from_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("adaperceiver_test_stages", ls_init_values=1.0).eval()


def test_every_old_setting_keeps_its_logits_and_flops(model):
    deeper = deepen_stem(model, 24).eval()
    assert deeper.cfg.stages == (*model.cfg.stages, model.cfg.stages[-1] + 1)
    assert len(deeper.grid) == len(model.grid) // len(model.cfg.stages) * len(deeper.cfg.stages)
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        for setting in model.grid:
            assert torch.equal(deeper(x, *setting), model(x, *setting)), setting
            assert deeper.flops(*setting) == model.flops(*setting), setting


def test_new_stage_starts_near_the_old_deepest_and_is_priced_by_the_counter(model):
    deeper = deepen_stem(model, 24).eval()
    x = torch.rand(6, 1, 28, 28)
    n = len(model.cfg.stem_dims)
    with torch.no_grad():
        before = model.stem.features(x, 0, n)
        after = deeper.stem.features(x, 0, n + 1)  # one more conv + GELU
        start = torch.nn.functional.gelu(before)  # what an identity conv would give on the old channels
        assert (after[:, : before.shape[1]] - start).norm() < 0.25 * start.norm()  # the identity, plus small noise
        assert after.shape[1] == 24
        proj_old, proj_new = model.stem.proj.weight, deeper.stem.proj.weight
        assert torch.equal(proj_new[:, : before.shape[1]], proj_old) and not proj_new[:, before.shape[1] :].any()
    assert measure_flops(deeper, x[:1]) == deeper.grid.full_flops > model.grid.full_flops


def test_refuses_what_it_cannot_deepen(model):
    with pytest.raises(ValueError, match="conv stem"):
        deepen_stem(create_model("adaperceiver_test"), 24)
    with pytest.raises(ValueError, match="channels must be"):
        deepen_stem(model, 8)  # narrower than the stem's last convolution (16)
    coarse = create_model("adaperceiver_test_stages", stem_strides=(1, 1, 2))  # last conv at 14x14, 7x7 patches
    with pytest.raises(ValueError, match="patch grid"):
        deepen_stem(coarse, 24)


def test_cli_writes_a_checkpoint_training_starts_from(model, tmp_path, capsys):
    src, out = tmp_path / "src.safetensors", tmp_path / "deeper.safetensors"
    sha = save_backbone(model, src)
    assert main(["--checkpoint", str(src), "--channels", "24", "--out", str(out)]) == 0
    assert "stages (0, 1, 2, 3, 4)" in capsys.readouterr().out
    assert read_metadata(out)["info"] == {"deepened_from": sha, "new_stem_channels": 24, "seed": 0}
    loaded = load_backbone(out)
    assert loaded.cfg.stem_dims == (8, 16, 16, 24) and loaded.cfg.stem_exits == (0, 1, 2, 3)
    trainable = init_from_checkpoint(out)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(trainable.eval()(x, *next(iter(model.grid))), model(x, *next(iter(model.grid))))

    assert main(["--checkpoint", str(src), "--channels", "4", "--out", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: channels must be") and err.count("\n") == 1
    assert not (tmp_path / "bad.safetensors").exists()
