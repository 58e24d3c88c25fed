"""Loading the released AdaPerceiver (issue 19): parity with the public code, refusals, conversion, FLOPs.

The fixture ``tests/fixtures/official_tiny`` was made once by ``scripts/make_official_fixture.py`` from the public
code (random weights, tiny config, release layout) with that code's logits at every setting; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from backbone import create_model, load_backbone, load_official, measure_flops
from backbone.checkpoint import CheckpointError, read_metadata
from backbone.convert_official import main as convert_main
from backbone.fileio import file_sha256
from backbone.flops import flops_breakdown
from backbone.layers import RotaryEmbedding1d
from backbone.official import official_config

FIXTURE = Path(__file__).parent / "fixtures" / "official_tiny"
VARIANTS = ("classifier", "attn_full", "distill")
TOL = 1e-4


def _expected(variant: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(FIXTURE / variant / "expected.safetensors"))


def _images(expected: dict[str, torch.Tensor]) -> torch.Tensor:
    return expected["images"].float() / 255


def _copy(variant: str, tmp_path: Path) -> Path:
    folder = tmp_path / variant
    shutil.copytree(FIXTURE / variant, folder)
    return folder


def _max_error(model, expected: dict[str, torch.Tensor]) -> float:
    """Largest |ours - official| over every (tokens, width, depth) and the per-sample widths."""
    x, cfg, worst = _images(expected), model.cfg, 0.0
    per_sample = expected["per_sample_widths"].tolist()
    with torch.no_grad():
        for k, g in enumerate(cfg.token_granularities):
            for d in range(1, cfg.depth + 1):
                for m, w in enumerate(cfg.widths):
                    worst = max(worst, (model(x, g, d, w) - expected["logits"][k, m, d - 1]).abs().max().item())
                ours = model(x, g, d, per_sample)
                worst = max(worst, (ours - expected["logits_per_sample"][k, d - 1]).abs().max().item())
    return worst


def test_fixture_tells_settings_apart() -> None:
    """Guards the parity test: logits of neighbouring settings differ by far more than the tolerance, so a model run
    at a wrong setting (or with the mask the other variant uses) cannot pass."""
    logits = _expected("classifier")["logits"]
    assert logits.shape == (3, 3, 3, 4, 5)
    for axis in range(3):
        assert (logits.diff(dim=axis).abs().amax(dim=(-1, -2)) > 100 * TOL).all(), f"axis {axis}"
    unmasked = _expected("attn_full")["logits"]
    assert (unmasked[1:] - logits[1:]).abs().max() > 100 * TOL  # no mask differs once there are two granularities
    torch.testing.assert_close(unmasked[0], logits[0], atol=1e-6, rtol=0)  # ... and equals it with one


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_public_code_at_every_setting(variant: str) -> None:
    model = load_official(FIXTURE / variant)
    cfg = model.cfg
    assert (cfg.token_granularities, cfg.widths, cfg.depth) == ((2, 4, 8), (4, 8, 16), 3)
    assert _max_error(model, _expected(variant)) <= TOL


@pytest.mark.parametrize("variant", ("classifier", "attn_full"))
def test_forward_all_equals_the_public_code(variant: str) -> None:
    """The one-pass sweep (block mask) and the per-granularity sweep (no mask) give the official logits too."""
    model, expected = load_official(FIXTURE / variant), _expected(variant)
    with torch.no_grad():
        for m, w in enumerate(model.cfg.widths):
            every = model.forward_all(_images(expected), width=w)  # (B, K, L, C)
            torch.testing.assert_close(every.permute(1, 2, 0, 3), expected["logits"][:, m], atol=TOL, rtol=0)


def test_release_config_maps_to_the_options() -> None:
    cfg = load_official(FIXTURE / "classifier").cfg
    assert cfg.mean == OPENAI_CLIP_MEAN and cfg.std == OPENAI_CLIP_STD
    assert (cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.num_classes, cfg.resize_size) == (32, 8, 3, 5, 37)
    assert (cfg.embed_mlp, cfg.norm_eps, cfg.head_norm, cfg.rope_fp32, cfg.latent_mask) == (True, 1e-6, False, True,
                                                                                            "block")  # fmt: skip
    assert load_official(FIXTURE / "attn_full").cfg.latent_mask == "none"


def test_in1k_size_matches_the_release_config() -> None:
    """``adaperceiver_in1k`` is what the loader builds from the release's config.json (values of DESIGN §2)."""
    release = {
        "embed_dim": 832, "num_heads": 13, "depth": 21, "max_latent_tokens": 256, "rope_theta": 10000,
        "ffn_ratio": 2.57, "ls_init_values": 1e-6, "mask_token_grans": [32, 64, 96, 128, 192, 256],
        "mat_dims": [416, 624, 832], "img_size": 224, "in_channels": 3, "patch_size": 16, "num_classes": 1000,
        "use_embed_ffn": True, "use_output_ffn": False, "attn_layer": "flex", "block_mask": "block",
    }  # fmt: skip
    ours = create_model("adaperceiver_in1k").cfg
    assert official_config(release, name="adaperceiver_in1k") == ours
    assert ours.resize_size == 256 and ours.mean == OPENAI_CLIP_MEAN
    assert official_config({**release, "patch_size": 14}).num_patches == 256  # the patch size comes from the file


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ffn_layer", "swiglu"),
        ("use_output_ffn", True),
        ("block_mask", "causal"),
        ("act_layer", "silu"),
        ("norm_layer", "rmsnorm"),
        ("attn_layer", "linear"),
        ("mask_token_grans", []),
        ("mask_token_grans", [2, 16]),
        ("mat_dims", [4, 32]),
        ("use_fourier", True),
    ],
)
def test_unrepresentable_config_is_refused_naming_the_field(tmp_path: Path, field: str, value: object) -> None:
    folder = _copy("classifier", tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(CheckpointError, match=rf"field {field}=") as info:
        load_official(folder)
    assert "\n" not in str(info.value)


def test_inert_fields_are_accepted(tmp_path: Path) -> None:
    folder = _copy("classifier", tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "drop_path": 0.3, "process_token_init": "norm_randn"}))
    # training-only fields: the model loads and computes what the release computes (drop_path is off in eval)
    assert _max_error(load_official(folder), _expected("classifier")) <= TOL


def test_prefixed_keys_load_and_bad_weights_are_named(tmp_path: Path) -> None:
    """``module.`` / ``_orig_mod.`` prefixes are stripped; a missing or unknown tensor is named in one line."""
    folder = _copy("classifier", tmp_path)
    state = safetensors.torch.load_file(str(folder / "model.safetensors"))
    prefixed = {f"module._orig_mod.{k}": v for k, v in state.items()}
    safetensors.torch.save_file(prefixed, str(folder / "model.safetensors"))
    assert _max_error(load_official(folder), _expected("classifier")) <= TOL
    for broken, word in (
        ({k: v for k, v in state.items() if k != "blocks.1.attn.k.weight"}, "missing"),
        ({**state, "blocks.9.attn.q.weight": torch.zeros(1)}, "unexpected"),
        ({**state, "patch_embed.pos_embed": torch.zeros(1, 3, 16)}, "wrong shape"),
    ):
        safetensors.torch.save_file(broken, str(folder / "model.safetensors"))
        with pytest.raises(CheckpointError, match=word) as info:
            load_official(folder)
        assert "\n" not in str(info.value)


def test_not_a_release_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_official(tmp_path)
    with pytest.raises(CheckpointError, match="neither a folder"):
        load_official(tmp_path / "config.json")


# --- the hub -----------------------------------------------------------------------------------------------------


def test_hub_id_not_cached_offline_is_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    with pytest.raises(CheckpointError, match="pjajal/adaperceiver-v1-in1k-ft is not in the Hugging Face cache") as e:
        load_official("in1k", cache_dir=tmp_path, local_files_only=True)
    assert "\n" not in str(e.value) and "pass that folder" in str(e.value)


def test_hub_id_resolves_through_the_cache(tmp_path: Path) -> None:
    """A model in huggingface_hub's cache layout loads offline, by its hub id."""
    pytest.importorskip("huggingface_hub")
    revision = "0" * 40
    repo = tmp_path / "models--someone--tiny-adaperceiver"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(FIXTURE / "classifier", repo / "snapshots" / revision)
    model = load_official("someone/tiny-adaperceiver", cache_dir=tmp_path, local_files_only=True)
    assert _max_error(model, _expected("classifier")) <= TOL


def test_missing_huggingface_hub_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"needs huggingface_hub \(pip install huggingface_hub\)"):
        load_official("someone/not-here")


# --- conversion --------------------------------------------------------------------------------------------------


def test_convert_official_writes_a_backbone_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = FIXTURE / "classifier", tmp_path / "tiny.safetensors"
    assert convert_main([str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert file_sha256(out) in printed and "27 settings" in printed
    info = read_metadata(out)["info"]
    assert info["source_sha256"] == file_sha256(src / "model.safetensors")
    assert info["source_config"] == json.loads((src / "config.json").read_text())
    converted = load_backbone(out)
    assert converted.cfg == load_official(src).cfg
    assert _max_error(converted, _expected("classifier")) <= TOL


def test_convert_official_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy("classifier", tmp_path)
    (folder / "config.json").write_text(json.dumps({"ffn_layer": "swiglu"}))
    assert convert_main([str(folder), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config.json field ffn_layer=") and err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(SystemExit) as e:
        convert_main(["--help"])
    assert e.value.code == 0 and "in1k" in capsys.readouterr().out


# --- FLOPs and RoPE tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ("classifier", "attn_full"))
def test_flops_of_the_release_options_match_the_counter(variant: str) -> None:
    """The adapter MLP's term (and every other) agrees with FlopCounterMode at every setting, exactly at batch 1."""
    model = load_official(FIXTURE / variant)
    cfg = model.cfg
    x = torch.rand(1, cfg.in_chans, cfg.img_size, cfg.img_size)
    for s in model.grid:
        assert model.flops(s.tokens, s.depth, s.width) == measure_flops(model, x, num_tokens=s.tokens, depth=s.depth,
                                                                         width=s.width), s  # fmt: skip
    without = flops_breakdown(cfg.replace(embed_mlp=False), 2, 1, 4)["embed"]
    assert flops_breakdown(cfg, 2, 1, 4)["embed"] - without == 4 * cfg.num_patches * 16 * int(16 * 2.57)


def test_fp32_rope_tables_are_the_releases() -> None:
    """``rope_fp32`` gives LLaMA's ``precompute_freqs_cis`` tables (float32 frequencies, ``torch.polar``), which
    differ from the float64-then-rounded ones at the release's size."""
    head_dim, n, theta = 64, 256, 10000.0
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    cis = torch.polar(torch.ones(n, head_dim // 2), torch.outer(torch.arange(n).float(), freqs))
    rope = RotaryEmbedding1d(head_dim, n, theta, fp32=True)
    torch.testing.assert_close(rope.cos[:, : head_dim // 2], cis.real, atol=1e-7, rtol=0)
    torch.testing.assert_close(rope.signed_sin[:, head_dim // 2 :], cis.imag, atol=1e-7, rtol=0)
    assert (RotaryEmbedding1d(head_dim, n, theta).cos - rope.cos).abs().max() > 1e-6


def test_default_options_add_no_parameters() -> None:
    """The new options are off by default: a default model has exactly the keys it had before them."""
    keys = set(create_model("adaperceiver_test").state_dict())
    assert "head_norm.weight" in keys and not any(k.startswith("embed_mlp") for k in keys)
    on = create_model("adaperceiver_test", embed_mlp=True, head_norm=False).state_dict()
    assert set(on) - keys == {f"embed_mlp.{p}" for p in ("norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                                         "mlp.fc2.weight", "mlp.fc2.bias")}  # fmt: skip
    assert keys - set(on) == {"head_norm.weight", "head_norm.bias"}
