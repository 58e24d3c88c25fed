"""Controller training, compute-saving inference, ablation and benchmark, end to end on the tiny test backbone.

A session-scoped tiny run (adaperceiver_test backbone with perturbed weights, 300 policy-train / 200 test images,
a few hundred PPO steps) is shared by most tests; everything writes under pytest's tmp folders.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backbone import create_model, load_backbone, save_backbone
from backbone.data import load_split
from backbone.flops import flop_counter
from backbone.layers.masks import block_causal_mask
from backbone.settings import Setting
from envs import get_observation, load_or_build
from policy import AdaptiveClassifier, CorePool, build_policy_config, load_classifier, train_controller
from policy.controller import choose_actions

REPO = Path(__file__).resolve().parent.parent
EVAL_KEYS = {"accuracy", "mean_flops", "controller_flops", "full_accuracy", "full_flops", "flops_saving",
             "best_fixed_accuracy_at_same_flops", "setting_counts"}  # fmt: skip
SMALL_PPO = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2, "timesteps": 256, "net_arch": [16, 16]}


def _tiny_backbone(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("adaperceiver_test", ls_init_values=1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_backbone(model, path)
    return path


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("policy")
    config = root / "policy.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/policy.yaml").read_text()), **SMALL_PPO}))
    return {
        "root": root,
        "config": config,
        "backbone": _tiny_backbone(root / "tiny.safetensors", seed=0),
        "other_backbone": _tiny_backbone(root / "other.safetensors", seed=1),
        "cache": root / "cache",
    }


def _cfg(work, out: Path | None, **kw):
    return build_policy_config(
        work["config"], backbone=str(work["backbone"]), out=None if out is None else str(out),
        cache_dir=str(work["cache"]),
        train_limit=300, eval_limit=200, **kw,
    )  # fmt: skip


@pytest.fixture(scope="session")
def run(work) -> Path:
    out, _ = train_controller(_cfg(work, work["root"] / "run"), progress=False)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


# --- train_policy.py -----------------------------------------------------------------------------------------------


def test_run_writes_every_file_with_documented_keys(run: Path) -> None:
    for name in ("policy.zip", "policy.json", "config.yaml", "eval.json", "progress.csv", "timing.json"):
        assert (run / name).is_file(), name
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) >= EVAL_KEYS
    assert ev["samples"] == 200
    assert sum(ev["setting_counts"].values()) == 200
    side = json.loads((run / "policy.json").read_text())
    assert side["backbone_sha256"] == load_backbone(side["backbone_path"]).checkpoint_sha256
    assert side["grid"] == {"token_granularities": [2, 4, 8], "depth": 3, "widths": [8, 16, 32]}
    assert side["controller_flops"] == side["obs_flops"] + side["actor_flops"] == ev["controller_flops"]
    assert side["timesteps"] >= 256 and side["flops_penalty"] == 0.3 and side["seed"] == 0
    assert ev["flops_saving"] == pytest.approx(1 - ev["mean_flops"] / ev["full_flops"])
    assert yaml.safe_load((run / "config.yaml").read_text())["flops_penalty"] == 0.3
    timing = json.loads((run / "timing.json").read_text())
    assert len(timing["parts"]) == 1 and timing["ppo_s"] == timing["parts"][0]["ppo_s"]


def test_table_evaluation_equals_running_the_controller(run: Path) -> None:
    """eval.json (looked up in the outcome table) equals compute-saving inference on the same 200 test images:
    same accuracy, same mean FLOPs (overhead and probe reuse included), same setting counts."""
    ev = json.loads((run / "eval.json").read_text())
    clf = AdaptiveClassifier.load(run)
    data = load_split("test").subset(200)
    pred = clf.predict(data.as_float())
    assert ev["accuracy"] == (pred.labels == data.labels).sum().item() / 200
    assert ev["mean_flops"] == pytest.approx(float(pred.flops.mean()), rel=1e-12)
    counts = {}
    for setting in pred.settings:
        counts[str(setting)] = counts.get(str(setting), 0) + 1
    assert ev["setting_counts"] == counts


def test_same_seed_reproduces_eval_json(work, run: Path) -> None:
    again, _ = train_controller(_cfg(work, work["root"] / "again"), progress=False)
    assert (again / "eval.json").read_text() == (run / "eval.json").read_text()


def test_resume_finishes_the_run_in_place(work, run: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    shutil.copytree(run, first)
    before = _progress_timesteps(first)
    out, metrics = train_controller(_cfg(work, None, timesteps=512), resume=str(first), progress=False)
    assert out == first and json.loads((first / "policy.json").read_text())["timesteps"] >= 512
    assert metrics["timesteps"] == json.loads((first / "eval.json").read_text())["timesteps"] >= 512
    steps = _progress_timesteps(first)
    assert steps[: len(before)] == before and len(steps) > len(before), "earlier progress rows must be kept"
    assert steps == sorted(set(steps)), "each rollout logged once"
    timing = json.loads((first / "timing.json").read_text())
    assert len(timing["parts"]) == 2
    assert timing["ppo_s"] == pytest.approx(sum(p["ppo_s"] for p in timing["parts"]), abs=0.2)
    with pytest.raises(ValueError, match="in place"):
        train_controller(_cfg(work, tmp_path / "elsewhere", timesteps=768), resume=str(first), progress=False)
    assert not (tmp_path / "elsewhere").exists(), "a refused resume leaves no folder behind"


def test_new_run_never_overwrites_a_controller(work, run: Path) -> None:
    with pytest.raises(ValueError, match="already holds a controller"):
        train_controller(_cfg(work, run), progress=False)


def _progress_timesteps(run: Path) -> list[int]:
    with (run / "progress.csv").open() as f:
        return [int(float(row["time/total_timesteps"])) for row in csv.DictReader(f)]


def test_cli_end_to_end_prints_report(work) -> None:
    out = work["root"] / "cli"
    r = _cli("train_policy.py", "--flops-penalty", "0.1", "--config", str(work["config"]), "--backbone",
             str(work["backbone"]), "--out", str(out), "--train-limit", "300", "--eval-limit", "200", "--cache-dir",
             str(work["cache"]), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["flops_penalty"] == 0.1
    assert f"{ev['accuracy']:.2%}" in r.stdout and "best fixed at <= same FLOPs" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flops-penalty", "-0.1"], "--flops-penalty must be >= 0"),
        (["--flops-penalty", "nan"], "--flops-penalty must be a finite number"),
        (["--backbone", "/nonexistent/b.safetensors"], "backbone checkpoint not found"),
        (["--data-dir", "/nonexistent"], "dataset-fashion-mnist"),
    ],
)
def test_cli_bad_input_exits_with_one_line(work, args: list[str], message: str) -> None:
    base = ["train_policy.py", "--config", str(work["config"]), "--backbone", str(work["backbone"]), "--cache-dir",
            str(work["root"] / "empty_cache"), "--out", str(work["root"] / "bad"), "--no-progress"]  # fmt: skip
    r = _cli(*base, *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_resume_from_another_backbone_is_refused(work, run: Path) -> None:
    r = _cli("train_policy.py", "--config", str(work["config"]), "--backbone", str(work["other_backbone"]),
             "--resume", str(run), "--cache-dir", str(work["cache"]),
             "--train-limit", "300", "--eval-limit", "200", "--no-progress")  # fmt: skip
    assert r.returncode != 0
    assert "trained for backbone sha256" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"({Path(work['backbone']).resolve()}), not " in r.stderr  # names the backbone to use, not the refused one


# --- compute-saving inference --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_split("test").subset(64).as_float()


def test_grouped_batch_equals_per_image(run: Path, images: torch.Tensor) -> None:
    clf = AdaptiveClassifier.load(run)
    pred = clf.predict(images)
    for i in range(len(images)):
        g, d, w, _ = pred.settings[i]
        alone = clf.backbone(images[i : i + 1], num_tokens=g, depth=d, width=w)
        torch.testing.assert_close(pred.logits[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        assert int(pred.labels[i]) == int(alone.argmax())
        reused = clf.reused_flops[tuple(pred.actions[i])]
        assert pred.flops[i] == clf.backbone.flops(g, d, w) - reused + clf.controller_flops


@pytest.mark.parametrize("observation", ["pooled", "probe"])
def test_other_observation_specs_train_and_predict(work, observation: str, images: torch.Tensor) -> None:
    """A controller trained on a non-default observation is loaded with it, and ``predict`` builds that observation:
    its choices are the policy's mode on that observation of each image, and its FLOPs add up."""
    out, _ = train_controller(_cfg(work, work["root"] / f"run_{observation}", observation=observation), progress=False)
    clf = AdaptiveClassifier.load(out)
    assert clf.spec.name == observation
    pred = clf.predict(images)
    obs = clf.spec.compute(clf.backbone, clf.backbone.embed(images))
    np.testing.assert_array_equal(pred.actions, choose_actions(clf.policy, obs))
    for i in range(len(images)):
        g, d, w, _ = pred.settings[i]
        torch.testing.assert_close(pred.logits[i : i + 1], clf.backbone(images[i : i + 1], g, d, w), atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
        assert pred.flops[i] == clf.backbone.flops(g, d, w) - clf.reused_flops[tuple(pred.actions[i])] + (
            clf.controller_flops
        )
    if observation == "pooled":  # no probe setting runs, so nothing is reused
        assert not clf.reused_flops.any()


def test_reported_flops_are_what_predict_runs(run: Path, images: torch.Tensor) -> None:
    """FlopCounterMode over adaptive inference (probe reuse, early exit, policy net) matches the reported FLOPs."""
    clf = AdaptiveClassifier.load(run)
    pred = clf.predict(images)
    assert (clf.reused_flops[tuple(pred.actions.T)] > 0).any(), "the tiny run should reuse the probe somewhere"
    # the counter sees matmuls, convolutions and attention; the analytic total also has the observation's
    # pooling/normalisation and softmax statistics, element-wise work it does not count
    cfg = clf.backbone.cfg
    elementwise = len(images) * (cfg.num_patches * cfg.embed_dim + 8 * cfg.embed_dim + 6 * cfg.num_classes)
    with flop_counter() as one_by_one:
        for i in range(len(images)):
            clf.predict(images[i : i + 1])
    assert one_by_one.get_total_flops() == pytest.approx(pred.flops.sum() - elementwise, rel=0.01)
    # batched, the input-independent latent/output queries run once per group instead of once per image
    with flop_counter() as batched:
        clf.predict(images)
    assert 0.9 * one_by_one.get_total_flops() < batched.get_total_flops() <= one_by_one.get_total_flops()


def test_predict_preserves_input_order(run: Path, images: torch.Tensor) -> None:
    clf = AdaptiveClassifier.load(run)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    a, b = clf.predict(images), clf.predict(images[perm])
    torch.testing.assert_close(b.logits, a.logits[perm], atol=1e-5, rtol=1e-5)
    assert [b.settings[i] for i in range(len(perm))] == [a.settings[int(j)] for j in perm]
    # a list of images gives the same as a batch tensor
    c = clf.predict(list(images))
    assert c.labels.tolist() == a.labels.tolist()


def test_choose_actions_is_the_distribution_mode(run: Path) -> None:
    clf = AdaptiveClassifier.load(run)
    obs = torch.randn(50, clf.spec.dim(clf.backbone))
    want = clf.policy.get_distribution(obs).mode().numpy().reshape(50, 3)
    np.testing.assert_array_equal(choose_actions(clf.policy, obs), want)


def test_mismatched_backbone_is_refused(work, run: Path) -> None:
    with pytest.raises(ValueError, match="trained for backbone sha256"):
        AdaptiveClassifier.load(run, backbone=work["other_backbone"])


def test_infer_cli_on_png_files(run: Path, images: torch.Tensor, tmp_path) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    r = _cli("-m", "policy.infer", "--policy", str(run), str(folder / "img0.png"), str(folder / "img1.png"),
             str(folder / "img2.png"), "--json", str(tmp_path / "out.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [Path(x["file"]).name for x in rows] == ["img0.png", "img1.png", "img2.png"]
    clf = AdaptiveClassifier.load(run)
    expected = clf.predict(torch.stack([images[i] for i in range(3)]))
    # PNG quantisation to 8 bits is lossless for these uint8-origin images, so labels and settings must agree
    assert [x["label"] for x in rows] == expected.labels.tolist()
    assert [Setting(**x["setting"]) for x in rows] == expected.settings
    assert "3 images: mean" in r.stdout
    bad = _cli("-m", "policy.infer", "--policy", str(run), str(folder / "broken.png"))
    assert bad.returncode != 0 and "cannot read image" in bad.stderr


@pytest.mark.parametrize("processes", ["1", "2"])
def test_infer_streams_a_folder_through_workers(run: Path, images: torch.Tensor, tmp_path, processes: str) -> None:
    """A nested folder, several batches read by 2 worker processes (and classified in 1 or 2): results in file order,
    equal to predicting the whole batch at once, and a summary with both paths' images/s and the agreement with the
    full setting."""
    folder = tmp_path / "many"
    n = 37  # not a multiple of the batch size: the last batch is short
    for i in range(n):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).save(folder / f"c{i % 3}" / f"{i:03d}.png")
    r = _cli("-m", "policy.infer", "--policy", str(run), str(folder), "--batch-size", "8", "--workers", "2",
             "--processes", processes, "--quiet", "--json", str(tmp_path / "out.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "out.json").read_text())
    order = sorted(range(n), key=lambda i: (f"c{i % 3}", f"{i:03d}"))
    assert [Path(x["file"]).name for x in rows] == [f"{i:03d}.png" for i in order]
    clf = AdaptiveClassifier.load(run)
    x = images[torch.tensor(order)]
    expected = clf.predict(x)
    assert [x["label"] for x in rows] == expected.labels.tolist()
    assert [Setting(**x["setting"]) for x in rows] == expected.settings
    agree = (clf.backbone(x).argmax(-1) == expected.labels).float().mean().item()
    assert f"same label as full on {agree:.1%}" in r.stdout
    assert "images/s vs full setting" in r.stdout and "\t" not in r.stdout  # --quiet: the summary only
    bad = folder / "c0" / "zz_broken.png"
    bad.write_bytes(b"not a png")
    r = _cli("-m", "policy.infer", "--policy", str(run), str(folder), "--workers", "2", "--no-full",
             "--processes", processes)  # fmt: skip
    assert r.returncode == 2 and f"cannot read image {bad}" in r.stderr


# --- ablation and benchmark ----------------------------------------------------------------------------------------


def _parse(label: str) -> tuple:
    """``"g/d/w"`` or ``"sS/g/d/w"`` -> Setting fields (tokens, depth, width, stage)."""
    parts = label.split("/")
    stage = int(parts.pop(0)[1:]) if parts[0].startswith("s") else None
    return (*map(int, parts), stage)


def test_ablation_end_to_end(work, run: Path, tmp_path) -> None:
    out = tmp_path / "ablation"
    r = _cli("-m", "policy.ablation", "--backbone", str(work["backbone"]), "--penalties", "0.3", "1.0", "--policies",
             str(run), "--config", str(work["config"]), "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
             "--train-limit", "300", "--eval-limit", "200", "--cache-dir", str(work["cache"]))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "ablation.json").read_text())
    assert len(result["fixed"]) == 27
    oneshot = [c for c in result["controllers"] if c["controller"] == "oneshot"]
    sequential = [c for c in result["controllers"] if c["controller"] == "sequential"]
    assert [c["flops_penalty"] for c in oneshot] == [c["flops_penalty"] for c in sequential] == [0.3, 1.0]
    assert result["controllers"][0]["run"] == str(run)  # the given run is used, the missing ones trained
    assert (tmp_path / "runs" / "fmnist__p1__s0" / "policy.zip").is_file()
    assert (tmp_path / "runs" / "fmnist__sequential__p0.3__s0" / "policy.zip").is_file()
    for name in ("ablation.md", "pareto.png", "compute_allocation.png"):
        assert (out / name).is_file(), name
    given = json.loads((run / "eval.json").read_text())  # the same controller scored on the same table
    assert result["controllers"][0]["accuracy"] == given["accuracy"]
    assert result["controllers"][0]["mean_flops"] == pytest.approx(given["mean_flops"])
    table = load_or_build(load_backbone(work["backbone"]), "test", dataset=load_split("test").subset(200),
                          cache_dir=work["cache"], progress=False)  # fmt: skip
    correct, flops = table.correct.reshape(200, -1), table.flops.ravel()
    cheapest = [flops[c].min() if c.any() else flops.max() for c in correct]  # brute force, image by image
    assert result["oracle"]["accuracy"] == pytest.approx(correct.any(1).mean())
    assert result["oracle"]["mean_flops"] == pytest.approx(np.mean(cheapest))
    assert [f["accuracy"] for f in result["fixed"]] == pytest.approx(table.accuracy().ravel().tolist())
    assert [f["pareto"] for f in result["fixed"]] == [r["pareto"] for r in table.grid.table(table.accuracy())]
    # the validation-selected fixed setting: the best on policy-train among those within the controller's FLOPs
    val = load_or_build(load_backbone(work["backbone"]), "policy-train", dataset=load_split("policy-train").subset(300),
                        cache_dir=work["cache"], progress=False).accuracy()  # fmt: skip
    for c in result["controllers"]:
        within = [(val[i], i) for i in table.grid.indices() if table.flops[i] <= c["mean_flops"]]
        if within:
            best = max(within, key=lambda t: t[0])
            assert val[table.grid.index(Setting(*_parse(c["validation_fixed_setting"])))] == best[0]
        # early exit at the same FLOPs: the best of every path's thresholds within the budget (brute force)
        ok = [
            e["accuracy"] for rows in result["early_exit"].values() for e in rows if e["mean_flops"] <= c["mean_flops"]
        ]
        if ok:
            assert c["early_exit_accuracy_at_same_flops"] == max(ok)
        else:
            assert np.isnan(c["early_exit_accuracy_at_same_flops"])
    assert all(len(v) == 13 for v in result["early_exit"].values())
    # the probe cascade of each penalty: the best (tau, X) on policy-train by the controller's reward, then test
    model = load_backbone(work["backbone"])
    train = load_or_build(model, "policy-train", dataset=load_split("policy-train").subset(300),
                          cache_dir=work["cache"], progress=False)  # fmt: skip
    spec = get_observation("probe")
    reused, overhead, full = spec.reused_flops(model), spec.flops(model), table.grid.full_flops

    probe = table.grid.smallest_index

    def cascade(t, tau, x):  # per image: (correct, FLOPs), written out image by image
        sure = t.confidence[(slice(None), *probe)] >= tau
        ok = [t.correct[(i, *probe)] if sure[i] else t.correct[(i, *x)] for i in range(len(t))]
        settings = [probe if sure[i] else x for i in range(len(t))]  # each image pays what its setting adds
        return np.mean(ok), np.mean([overhead + t.flops[s] - reused[s] for s in settings])

    assert [c["flops_penalty"] for c in result["probe_cascade"]] == [0.3, 1.0]
    for c in result["probe_cascade"]:
        x = table.grid.index(Setting(*_parse(c["setting"])))
        assert (c["train_accuracy"], c["train_mean_flops"]) == pytest.approx(cascade(train, c["tau"], x))
        assert (c["accuracy"], c["mean_flops"]) == pytest.approx(cascade(table, c["tau"], x))
        best = c["train_accuracy"] - c["flops_penalty"] * c["train_mean_flops"] / full
        for tau in (0.5, 0.9, 1.01):  # no other threshold and second setting earns more on policy-train
            for i in table.grid.indices():
                a, f = cascade(train, tau, i)
                assert a - c["flops_penalty"] * f / full <= best + 1e-12
        # and it is compared with the baselines at its FLOPs as a controller is
        cheaper = [f["accuracy"] for f in result["fixed"] if f["flops"] <= c["mean_flops"]]
        assert c["front_accuracy_at_same_flops"] == max(cheaper)
        assert c["on_or_above_front"] == (c["accuracy"] >= max(cheaper)) and 0 <= c["vs_best_fixed_p_value"] <= 1
        assert c["validation_fixed_setting"] and 0 <= c["vs_validation_fixed_p_value"] <= 1
    # the cascade aimed at the iso-accuracy point: the cheapest on policy-train within 0.05 points of the full setting
    iso = result["iso_cascade"]
    full_train = train.correct[(slice(None), *table.grid.full_index)].mean()
    x = table.grid.index(Setting(*_parse(iso["setting"])))
    assert iso["accuracy_drop"] == pytest.approx(0.0005) and iso["full_train_accuracy"] == pytest.approx(full_train)
    assert iso["train_accuracy"] >= full_train - 0.0005 - 1e-12
    assert (iso["train_accuracy"], iso["train_mean_flops"]) == pytest.approx(cascade(train, iso["tau"], x))
    assert (iso["accuracy"], iso["mean_flops"]) == pytest.approx(cascade(table, iso["tau"], x))
    for tau in (0.5, 0.9, 1.01):
        for i in table.grid.indices():
            a, f = cascade(train, tau, i)
            assert not (a >= full_train - 0.0005 - 1e-12 and f < iso["train_mean_flops"] - 1e-6)
    full_test = max(result["fixed"], key=lambda r: r["flops"])["accuracy"]
    assert iso["gap_to_full"] == pytest.approx(full_test - iso["accuracy"])
    gap = iso["paired_gap_to_full"]  # the same gap, with its interval from the per-image differences around it
    assert gap["gap"] == pytest.approx(iso["gap_to_full"]) and gap["gap_ci95"][0] <= gap["gap"] <= gap["gap_ci95"][1]
    for ctrl in result["controllers"]:
        cascade = next(c for c in result["probe_cascade"] if c["flops_penalty"] == ctrl["flops_penalty"])
        assert (ctrl["cascade_accuracy"], ctrl["cascade_mean_flops"]) == (cascade["accuracy"], cascade["mean_flops"])
        assert 0 <= ctrl["vs_cascade_p_value"] <= 1
    md = (out / "ablation.md").read_text()
    assert "## Controllers" in md and "Oracle" in md and "early exit" in md and "aimed at that point" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_end_to_end(run: Path, tmp_path) -> None:
    path = tmp_path / "bench.json"
    r = _cli("-m", "policy.benchmark", "--policy", str(run), "--limit", "64", "--limit-batch1", "8", "--repeats", "1",
             "--matmul-size", "128", "--json", str(path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(path.read_text())
    assert [row["batch_size"] for row in result["rows"]] == [256, 1]
    for row in result["rows"]:
        rate = row["full_img_s"] * result["full_flops"] / 1e9
        assert row["full_fraction_of_matmul"] == pytest.approx(rate / result["matmul_gflops_per_s"])
    for row in result["rows"]:
        ratios = [a / f for a, f in zip(row["adaptive_img_s_runs"], row["full_img_s_runs"], strict=True)]
        assert len(ratios) == 1 and row["speedup"] == pytest.approx(statistics.median(ratios))
        bounds = [c / f for c, f in zip(row["front_img_s_runs"], row["full_img_s_runs"], strict=True)]
        assert row["speedup_bound_from_front"] == pytest.approx(statistics.median(bounds))
        assert row["front_img_s"] > 0
        assert row["flops_ratio"] == pytest.approx(result["full_flops"] / row["adaptive_mean_flops"])
    assert [row["images"] for row in result["rows"]] == [64, 8]
    assert result["cpu"]["model"] and set(result["cpu"]["isa"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert "speedup / FLOPs ratio" in r.stdout


def test_compiled_front_and_full_setting_equal_eager(run: Path, tmp_path) -> None:
    """benchmarks.compile_front: inductor-compiled full setting and controller front give the eager outputs."""
    path = tmp_path / "compile.json"
    r = _cli("-m", "benchmarks.compile_front", "--policy", str(run), "--images", "2", "--repeats", "1",
             "--json", str(path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(path.read_text())
    assert result["full_max_abs_diff"] < 1e-4 and result["front_max_abs_diff"] < 1e-4
    assert result["bound_eager"] == pytest.approx(result["full_eager_us"] / result["front_eager_us"])
    assert result["batch_size"] == 1 and result["images"] == 2
    r = _cli("-m", "benchmarks.compile_front", "--policy", str(run), "--images", "3", "--batch-size", "4")
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and len(errors) == 1 and "--batch-size" in errors[0]


def test_profile_phases_time_predict_without_changing_it_and_put_the_functions_back(run: Path) -> None:
    """benchmarks.profile_adaptive's wall-clock phases: predict gives the same answer while timed, every phase it
    runs is timed and none exceeds the whole, and the wrapped functions are the originals again afterwards."""
    from benchmarks.profile_adaptive import phase_table, timed_phases
    from envs import observations

    clf = AdaptiveClassifier.load(run)
    images = load_split("test").subset(24).as_float()
    plain = clf.predict(images)
    originals = (observations.run_probe, observations.observe_embed)
    with timed_phases(clf) as seconds:
        t0 = time.perf_counter()
        timed = clf.predict(images)
        total = time.perf_counter() - t0
    assert torch.equal(timed.logits, plain.logits) and np.array_equal(timed.actions, plain.actions)
    assert {"stage-0 embedding", "probe (read, block, write-out)", "controller", "reads (the probe's included)",
            "write-outs (the probe's included)"} <= set(seconds)  # fmt: skip
    assert all(0 < v <= total for v in seconds.values())
    assert (observations.run_probe, observations.observe_embed) == originals
    assert not {"choose", "_run_blocks"} & set(vars(clf)) and not {"continue_embed", "read_latents"} & set(
        vars(clf.backbone)
    )
    table = phase_table(clf, images, batch=8, repeats=1)
    assert table.splitlines()[-1].startswith("| predict | 100% |") and "| controller |" in table


def test_stem_layout_benchmark_times_both_layouts_with_equal_labels(run: Path, tmp_path) -> None:
    """benchmarks.stem_layout: the run's predict with channels-last and NCHW weights agrees; the figures are the
    medians of the runs it records."""
    path = tmp_path / "layout.json"
    r = _cli("-m", "benchmarks.stem_layout", "--policy", str(run), "--images", "16", "--batch-size", "8",
             "--repeats", "3", "--json", str(path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(path.read_text())
    assert result["same_labels"] and result["max_abs_logit_diff"] < 1e-4
    runs = result["img_s_runs"]
    assert set(runs) == {"predict_channels_last", "predict_nchw", "full_channels_last", "full_nchw"}
    assert all(len(v) == 3 and min(v) > 0 for v in runs.values())
    ratios = [a / b for a, b in zip(runs["predict_channels_last"], runs["predict_nchw"], strict=True)]
    assert result["predict_speedup"] == pytest.approx(statistics.median(ratios))


def test_operator_variants_compute_what_they_replace() -> None:
    """benchmarks.operator_variants: the fused conv+GELU stem and the explicit small attention equal the code they
    stand in for (masked and unmasked, few keys and many), and the attention variant is really the one called."""
    from benchmarks.operator_variants import SMALL_KEYS, fused_stem, small_attention

    torch.manual_seed(0)
    model = create_model("adaperceiver_test_stages").eval()
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        stem = model.stem
        plain = [stem.features(x, 0, s) for s in stem.stages]
        with fused_stem():
            assert type(stem).features.__name__ == "_fused_features"
            fused = [stem.features(x, 0, s) for s in stem.stages]
            resumed = stem.features(fused[1], stem.stages[1], stem.stages[-1])
    for a, b in zip(plain, fused, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(resumed, plain[-1], atol=1e-5)
    mask = block_causal_mask((2, 4, 8))
    for keys, m in ((2, None), (8, mask), (SMALL_KEYS + 4, None)):
        q, k, v = torch.randn(3, 6, 4, keys, 16)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m if keys == 8 else None)
        with small_attention():
            got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m if keys == 8 else None)
            assert torch.nn.functional.scaled_dot_product_attention.__name__ == "_explicit_attention"
        assert torch.allclose(got, expected, atol=1e-5)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_library_attention_variant_switches_the_two_key_form_off_and_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks.operator_variants' ``library_attention``: while on, two-key attention goes to the library kernel
    (the baseline the shipped closed form is timed against); after it, the closed form again."""
    from backbone.layers.attention import TWO_KEY_MIN_ROWS, attention
    from benchmarks.operator_variants import library_attention

    q, k, v = torch.randn(3, TWO_KEY_MIN_ROWS, 1, 2, 16)
    calls = []
    library = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or library(*a, **kw)
    )
    with torch.no_grad():
        closed = attention(q, k, v)
        with library_attention():
            kernel = attention(q, k, v)
        attention(q, k, v)
    assert len(calls) == 1 and torch.allclose(closed, kernel, atol=1e-6)


def test_compiled_variant_runs_predict_through_compiled_pieces_and_puts_them_back(run: Path) -> None:
    """benchmarks.operator_variants' ``compiled``: predict through the captured pieces (dynamo's eager backend: the
    same capture and patching as inductor, without its code generation) gives the same settings and logits, every
    piece is the compiled one while it is on, and the originals are back afterwards."""
    from backbone.model import AdaPerceiver
    from benchmarks.operator_variants import COMPILED_METHODS, compiled
    from envs import observations

    clf = AdaptiveClassifier.load(run)
    images = load_split("test").subset(24).as_float()
    originals = {name: getattr(AdaPerceiver, name) for name in COMPILED_METHODS}
    probe = observations.run_probe
    with torch.inference_mode():
        plain = clf.predict(images)
        with compiled(backend="eager"):
            assert all(getattr(AdaPerceiver, name) is not fn for name, fn in originals.items())
            assert observations.run_probe is not probe
            captured = [clf.predict(part) for part in images.split(8)]
    assert {name: getattr(AdaPerceiver, name) for name in COMPILED_METHODS} == originals
    assert observations.run_probe is probe
    assert np.array_equal(np.concatenate([c.actions for c in captured]), plain.actions)
    assert torch.allclose(torch.cat([c.logits for c in captured]), plain.logits, atol=1e-5)


def test_operator_variants_benchmark_reports_paired_medians(run: Path, tmp_path) -> None:
    path = tmp_path / "variants.json"
    r = _cli("-m", "benchmarks.operator_variants", "--policy", str(run), "--images", "16", "--batch-size", "8",
             "--repeats", "3", "--variants", "fused_stem", "small_attention", "--json", str(path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(path.read_text())
    assert all(c["same_labels"] and c["max_abs_logit_diff"] < 1e-4 for c in result["checks"].values())
    runs = result["img_s_runs"]
    assert set(runs) == {"as_is", "fused_stem", "small_attention"}
    assert all(len(v) == 3 and min(v) > 0 for v in runs.values())
    for name in ("fused_stem", "small_attention"):
        ratios = [a / b for a, b in zip(runs[name], runs["as_is"], strict=True)]
        assert result["speedup"][name] == pytest.approx(statistics.median(ratios))


@pytest.mark.parametrize(
    ("module", "flag", "value"),
    [("benchmarks.stem_layout", "--repeats", "0"), ("benchmarks.operator_variants", "--images", "0"),
     ("benchmarks.profile_adaptive", "--batch-size", "0"), ("policy.ablation", "--iso-drop", "-1")],
)  # fmt: skip
def test_commands_refuse_a_bad_count_in_one_line(module: str, flag: str, value: str) -> None:
    """One error line naming the flag (after argparse's usage lines when argparse itself refuses it), exit 2."""
    r = _cli("-m", module, flag, value)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and len(errors) == 1 and flag in errors[0] and r.stderr.strip().endswith(errors[0])


def test_missing_run_folder_is_named(tmp_path) -> None:
    r = _cli("-m", "policy.benchmark", "--policy", str(tmp_path / "nope"))
    assert r.returncode != 0
    assert "no such run folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- recipe cross-validation ---------------------------------------------------------------------------------------


def test_recipe_cv_pools_held_out_folds_and_scores_the_cascade_on_them(work, tmp_path) -> None:
    from policy import recipe_cv
    from policy.evaluation import choose_cascade

    out = tmp_path / "cv"
    args = ["--backbone", str(work["backbone"]), "--config", str(work["config"]), "--cache-dir", str(work["cache"]),
            "--train-limit", "300", "--folds", "3", "--timesteps", "512", "--out", str(out),
            "--variants", "ent_coef=0.01", "ent_coef=0,n_epochs=2", "observation=probe"]  # fmt: skip
    assert recipe_cv.main(args) == 0
    result = json.loads((out / "recipe_cv.json").read_text())
    assert (out / "recipe_cv.md").is_file()
    assert result["samples"] == 300 and result["folds"] == 3
    assert [v["variant"] for v in result["variants"]] == ["ent_coef=0.01", "ent_coef=0,n_epochs=2", "observation=probe"]
    # the probe-only controller is priced as one: its observation (3 numbers) and its own network, no pooled features
    probe_only = result["variants"][2]
    assert probe_only["mean_flops"] >= get_observation("probe").flops(load_backbone(work["backbone"]))
    model = load_backbone(work["backbone"])
    full = model.grid.full_flops
    for v in [*result["variants"], result["probe_cascade"]]:
        assert v["reward"] == pytest.approx(v["accuracy"] - 0.3 * v["mean_flops"] / full)
        assert 0 <= v["accuracy"] <= 1 and v["mean_flops"] > 0
    assert "vs_first_p_value" not in result["variants"][0] and 0 <= result["variants"][1]["vs_first_p_value"] <= 1
    # the cascade of each fold is chosen on the other folds only and scored on its own: rebuild it fold by fold
    table = load_or_build(model, "policy-train", dataset=load_split("policy-train").subset(300),
                          cache_dir=work["cache"], progress=False)  # fmt: skip
    folds = np.array_split(np.random.default_rng(1234).permutation(300), 3)
    assert sorted(np.concatenate(folds).tolist()) == list(range(300))
    hits, spent = 0, 0.0
    for k, held in enumerate(folds):
        fit = table.subset(np.concatenate([f for j, f in enumerate(folds) if j != k]))
        c = choose_cascade(model, fit, table.subset(held), 0.3)
        hits, spent = hits + c["outcome"].sum(), spent + c["mean_flops"] * len(held)
    assert result["probe_cascade"]["accuracy"] == pytest.approx(hits / 300)
    assert result["probe_cascade"]["mean_flops"] == pytest.approx(spent / 300)


def test_recipe_cv_refuses_bad_variants_in_one_line(work, tmp_path, capsys) -> None:
    from policy import recipe_cv

    common = ["--backbone", str(work["backbone"]), "--config", str(work["config"]), "--cache-dir", str(work["cache"]),
              "--train-limit", "300", "--out", str(tmp_path)]  # fmt: skip
    for variants, message in ((["ent_coef"], "expected key=value"), (["no_such_option=1"], "no_such_option"),
                              (["controller=sequential"], "only one-shot")):  # fmt: skip
        assert recipe_cv.main([*common, "--variants", *variants]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit) as done:
        recipe_cv.main([*common, "--folds", "1", "--variants", "ent_coef=0"])
    assert done.value.code == 2 and "--folds: must be an integer >= 2" in capsys.readouterr().err


def test_outcome_table_subset_keeps_the_rows_it_names(work) -> None:
    model = load_backbone(work["backbone"])
    table = load_or_build(model, "policy-train", dataset=load_split("policy-train").subset(300),
                          cache_dir=work["cache"], progress=False)  # fmt: skip
    rows = np.array([5, 0, 299, 17])
    part = table.subset(rows)
    assert len(part) == 4 and part.data_sha256 == "" and part.grid is table.grid
    for name in ("correct", "loss", "pred", "confidence", "margin", "entropy", "labels", "obs"):
        np.testing.assert_array_equal(getattr(part, name), getattr(table, name)[rows])


# --- the probe cascade as a controller (train_policy.py --controller cascade) --------------------------------------


@pytest.fixture(scope="module")
def cascade_run(work) -> Path:
    out, _ = train_controller(_cfg(work, work["root"] / "cascade", controller="cascade", flops_penalty=0.1),
                              progress=False)  # fmt: skip
    return out


def test_cascade_run_is_the_best_cascade_on_policy_train(work, cascade_run: Path) -> None:
    """The fitted (tau, X) earns the highest mean reward on policy-train of every threshold and every setting
    (checked image by image with cascade_outcome), and the run folder says what it is."""
    from policy.baselines import cascade_outcome
    from policy.cascade import CASCADE_TAUS, load_cascade

    for name in ("cascade.json", "policy.json", "config.yaml", "eval.json", "timing.json"):
        assert (cascade_run / name).is_file(), name
    assert not (cascade_run / "policy.zip").exists()
    side = json.loads((cascade_run / "policy.json").read_text())
    assert side["controller"] == "cascade" and side["observation"] == "probe" and side["actor_flops"] == 0
    model = load_backbone(work["backbone"])
    cascade = load_cascade(cascade_run / "cascade.json", model.grid.shape)
    assert cascade.probe == model.grid.index(model.grid.smallest)
    table = load_or_build(model, "policy-train", dataset=load_split("policy-train").subset(300),
                          cache_dir=work["cache"], progress=False)  # fmt: skip
    spec = get_observation("probe")
    assert side["controller_flops"] == spec.flops(model)
    args = (table.correct, table.confidence, model.grid.flops, spec.reused_flops(model), spec.flops(model))

    def reward(tau: float, setting: tuple) -> float:
        ok, cost = cascade_outcome(*args, tau, setting, cascade.probe)
        return ok.mean() - 0.1 * cost.mean() / model.grid.full_flops

    best = reward(cascade.tau, cascade.setting)
    assert best == pytest.approx(side["train_accuracy"] - 0.1 * side["train_mean_flops"] / model.grid.full_flops)
    assert all(reward(tau, s) <= best + 1e-12 for tau in CASCADE_TAUS for s in np.ndindex(model.grid.shape))


def test_cascade_eval_equals_running_it(work, cascade_run: Path, images: torch.Tensor) -> None:
    """eval.json (from the test table) equals compute-saving inference of the loaded run on the same 200 images;
    each image runs at the probe when the probe's top-1 probability >= tau, else at X, and its logits equal the
    image run alone at that setting."""
    ev = json.loads((cascade_run / "eval.json").read_text())
    clf = load_classifier(cascade_run)
    data = load_split("test").subset(200)
    pred = clf.predict(data.as_float())
    assert ev["accuracy"] == (pred.labels == data.labels).sum().item() / 200
    assert ev["mean_flops"] == pytest.approx(float(pred.flops.mean()), rel=1e-12)
    cascade, model = clf.policy, clf.backbone
    top1 = get_observation("probe").compute(model, model.embed(data.as_float()))[:, 0].numpy()
    want = np.where((top1 >= cascade.tau)[:, None], [cascade.probe], [cascade.setting])
    np.testing.assert_array_equal(pred.actions, want)
    assert {str(s) for s in pred.settings} <= {ev["setting"], str(model.grid.smallest)}
    # the tiny model's probe is never sure enough to stop: split the images with a threshold between two of its
    # live confidences, and the table's rule (what eval.json and the ablation score) still picks what predict runs
    from policy.cascade import ProbeCascade

    ranked = np.sort(top1)
    split = ProbeCascade(float(ranked[99] + ranked[100]) / 2, cascade.setting, cascade.probe)
    table = load_or_build(model, "test", dataset=data, cache_dir=work["cache"], progress=False)
    live = AdaptiveClassifier(model, split, "probe").predict(data.as_float())
    assert 0 < (live.actions == np.array(cascade.probe)).all(1).sum() < 200
    np.testing.assert_array_equal(split.table_actions(table), live.actions)
    small = clf.predict(images)
    for i in range(len(images)):
        g, d, w, _ = small.settings[i]
        torch.testing.assert_close(small.logits[i : i + 1], model(images[i : i + 1], g, d, w), atol=1e-5, rtol=1e-5)


def test_choose_cascade_fits_on_policy_train_and_scores_on_test(work) -> None:
    """With a probe that is sure exactly when it is right (the tiny model never is: its confidences are planted
    here), the chosen cascade splits the images; its test figures are those of its (tau, X) run image by image on
    the test table, and its actions are the threshold rule on the test table's probe confidence."""
    import dataclasses

    from policy.baselines import cascade_outcome
    from policy.evaluation import choose_cascade

    model = load_backbone(work["backbone"])
    tables = []
    for split, n in (("policy-train", 300), ("test", 200)):
        t = load_or_build(model, split, dataset=load_split(split).subset(n), cache_dir=work["cache"], progress=False)
        probe_right = t.correct[(slice(None), 0, 0, 0)]
        confidence = t.confidence.copy()
        confidence[:, 0, 0, 0] = np.where(probe_right, 0.97, 0.6)
        tables.append(dataclasses.replace(t, confidence=confidence))
    train, test = tables
    c = choose_cascade(model, train, test, 0.3)
    spec = get_observation("probe")
    assert 0.6 < c["tau"] <= 0.97 and 0 < c["stopped_at_probe"] < 1
    x = model.grid.index(Setting(*_parse(c["setting"])))
    ok, cost = cascade_outcome(test.correct, test.confidence, model.grid.flops, spec.reused_flops(model),
                               spec.flops(model), c["tau"], x, (0, 0, 0))  # fmt: skip
    assert c["accuracy"] == pytest.approx(ok.mean()) and c["mean_flops"] == pytest.approx(cost.mean())
    np.testing.assert_array_equal(c["outcome"], ok)
    assert c["stopped_at_probe"] == pytest.approx((test.confidence[:, 0, 0, 0] >= c["tau"]).mean())


def test_cascade_fitted_to_accuracy_is_the_cheapest_within_the_drop_and_is_checked_for_iso_accuracy(work) -> None:
    """fit_cascade_to_accuracy: among every (tau, X), priced image by image (cascade_outcome), none cheaper reaches
    the full setting's accuracy minus the drop, and the chosen one does; drop 0 can always fall back to the full
    setting. iso_check's verdict follows its three conditions."""
    import dataclasses

    from policy.baselines import cascade_outcome
    from policy.cascade import CASCADE_TAUS, fit_cascade_to_accuracy
    from policy.evaluation import choose_cascade, iso_check

    model = load_backbone(work["backbone"])
    t = load_or_build(model, "policy-train", dataset=load_split("policy-train").subset(300), cache_dir=work["cache"],
                      progress=False)  # fmt: skip
    confidence = t.confidence.copy()
    confidence[:, 0, 0, 0] = np.where(t.correct[(slice(None), 0, 0, 0)], 0.97, 0.6)  # a probe that splits the images
    t = dataclasses.replace(t, confidence=confidence)
    spec, grid = get_observation("probe"), model.grid
    full_acc = t.correct[(slice(None), *grid.full_index)].mean()
    for drop in (0.0, 0.02):
        cascade, acc, cost = fit_cascade_to_accuracy(model, t, drop)
        ok, c = cascade_outcome(t.correct, t.confidence, grid.flops, spec.reused_flops(model), spec.flops(model),
                                cascade.tau, cascade.setting, cascade.probe)  # fmt: skip
        assert acc == pytest.approx(ok.mean()) and cost == pytest.approx(c.mean()) and acc >= full_acc - drop - 1e-12
        for tau in CASCADE_TAUS[::5]:
            for x in grid.indices():
                ok, c = cascade_outcome(t.correct, t.confidence, grid.flops, spec.reused_flops(model),
                                        spec.flops(model), tau, x, cascade.probe)  # fmt: skip
                assert not (ok.mean() >= full_acc - drop - 1e-12 and c.mean() < cost - 1e-6), (drop, tau, x)
    with pytest.raises(ValueError, match="fraction"):
        fit_cascade_to_accuracy(model, t, -0.1)
    for kwargs in ({}, {"penalty": 0.3, "accuracy_drop": 0.0}):  # fitted by a penalty or to a drop, never both
        with pytest.raises(ValueError, match="exactly one"):
            choose_cascade(model, t, t, **kwargs)
    fixed = [{"tokens": 2, "depth": 1, "width": 8, "flops": 10.0, "accuracy": 0.80},
             {"tokens": 8, "depth": 3, "width": 32, "flops": 100.0, "accuracy": 0.90}]  # fmt: skip
    assert iso_check({"accuracy": 0.8995, "mean_flops": 40.0}, fixed)["meets_iso_accuracy"]
    assert not iso_check({"accuracy": 0.8985, "mean_flops": 40.0}, fixed)["meets_iso_accuracy"]  # 0.15 points under
    assert not iso_check({"accuracy": 0.8995, "mean_flops": 80.0}, fixed)["meets_iso_accuracy"]  # 20% saving only
    assert iso_check({"accuracy": 0.8995, "mean_flops": 40.0}, fixed)["cheapest_fixed_as_accurate"] == "8/3/32"
    as_good = [*fixed, {"tokens": 4, "depth": 2, "width": 16, "flops": 50.0, "accuracy": 0.8996}]
    near = iso_check({"accuracy": 0.8995, "mean_flops": 40.0}, as_good)  # 60% under full, only 20% under 4/2/16
    assert near["cheapest_fixed_as_accurate"] == "4/2/16" and not near["meets_iso_accuracy"]


def test_paired_gap_to_the_full_setting() -> None:
    """The gap's 95% interval comes from the per-image differences: equal swaps give a wide interval around 0 and
    McNemar p = 1; ten images lost out of 100 give 0.1 +- 1.96 * sd / 10 and p = 2 / 2**10."""
    from policy.evaluation import paired_gap

    g = paired_gap(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 1], bool))
    assert g["gap"] == 0 and g["gap_ci95"] == pytest.approx([-0.8002, 0.8002], abs=1e-4) and g["mcnemar_p_vs_full"] == 1
    full, lost = np.ones(100, bool), np.r_[np.zeros(10, bool), np.ones(90, bool)]
    g = paired_gap(full, lost)
    half = 1.96 * np.sqrt(0.1 * 0.9 * 100 / 99) / 10
    assert g["gap"] == pytest.approx(0.1) and g["gap_ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    assert g["mcnemar_p_vs_full"] == pytest.approx(2 / 2**10)
    with pytest.raises(ValueError, match="paired"):
        paired_gap(full, lost[:50])


def test_cascade_refuses_what_it_cannot_use(work, cascade_run: Path, tmp_path) -> None:
    """PPO-only options are refused in one line (not ignored); a cascade file of another grid, and a cascade
    given to the ablation (which fits its own), are refused too."""
    from policy.cascade import load_cascade

    r = _cli("train_policy.py", "--controller", "cascade", "--timesteps", "5", "--config", str(work["config"]))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--timesteps" in r.stderr, r.stderr
    bad = tmp_path / "cascade.json"
    bad.write_text(json.dumps({"tau": 0.9, "setting": [5, 0, 0], "probe": [0, 0, 0]}))
    with pytest.raises(ValueError, match="not an index of the settings grid"):
        load_cascade(bad, (3, 3, 3))
    r = _cli("-m", "policy.ablation", "--backbone", str(work["backbone"]), "--penalties", "0.3", "--policies",
             str(cascade_run), "--config", str(work["config"]), "--out", str(tmp_path / "ab"), "--train-limit", "300",
             "--eval-limit", "200", "--cache-dir", str(work["cache"]))  # fmt: skip
    assert r.returncode == 2 and "is a probe cascade" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_blocks_of_mixed_depths_widths_and_probe_rows_equal_each_row_alone(run: Path) -> None:
    """``_run_blocks`` (one attention per block for every width, the MLP per width, early exit by prefix) gives each
    row what it gets alone: blocks 1..depth at its width, from block 2 for a row that continues the probe."""
    clf = AdaptiveClassifier.load(run)
    model, cfg = clf.backbone, clf.backbone.cfg
    rng = np.random.default_rng(0)
    n, g = 40, cfg.token_granularities[0]
    torch.manual_seed(0)
    latents = torch.randn(n, g, cfg.embed_dim)
    depth = rng.integers(1, cfg.depth + 1, n)
    widths = np.array(cfg.widths)[rng.integers(0, len(cfg.widths), n)]
    past_block1 = rng.random(n) < 0.3
    with torch.no_grad():
        out = clf._run_blocks(latents, depth, widths, past_block1)
        for i in range(n):
            start = int(past_block1[i])
            want = model.forward_blocks(latents[i : i + 1], start, max(int(depth[i]), start), int(widths[i]))
            torch.testing.assert_close(out[i : i + 1], want, atol=1e-5, rtol=1e-5)


# --- policy.core_pool: batches on worker processes ----------------------------------------------------------------


def _same_prediction(got, want) -> None:
    assert torch.equal(got.labels, want.labels) and got.settings == want.settings
    np.testing.assert_array_equal(got.actions, want.actions)
    np.testing.assert_array_equal(got.flops, want.flops)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_core_pool_gives_what_the_classifier_gives_here_in_input_order(run: Path, images: torch.Tensor) -> None:
    """Every method, through the shared slots and (a batch larger than a slot) pickled instead."""
    clf = AdaptiveClassifier.load(run)
    sizes = [7, 1, 16, 5, 8, 3]  # 16 does not fit a slot of 8
    batches = list(images[: sum(sizes)].split(sizes))
    with CorePool(clf, processes=2, batch_size=8) as pool, torch.no_grad():
        got = list(pool.map("predict", batches))
        assert len(got) == len(batches)
        for g, b in zip(got, batches, strict=True):
            _same_prediction(g, clf.predict(b))
        for g, b in zip(pool.map("full", batches[:3]), batches[:3], strict=True):
            torch.testing.assert_close(g, clf.backbone(b), atol=1e-5, rtol=1e-5)
        for g, b in zip(pool.map("front", batches[:3]), batches[:3], strict=True):
            np.testing.assert_array_equal(g, clf.front(b)[-1])
        assert list(pool.map("predict", [])) == []


def test_core_pool_raises_a_workers_error_here_and_keeps_working(run: Path, images: torch.Tensor) -> None:
    clf = AdaptiveClassifier.load(run)
    nan = images[:4].clone()
    nan[1, 0, 3, 3] = float("nan")
    cropped = images[:4, :, :20]  # does not fit a slot: pickled, refused by the model as here
    with CorePool(clf, processes=2, batch_size=8) as pool:
        for bad in (nan, cropped):
            with pytest.raises(ValueError) as here:
                clf.predict(bad)
            with pytest.raises(ValueError) as there:
                list(pool.map("predict", [images[:8], bad, images[8:16], images[16:24]]))
            assert str(there.value) == str(here.value)
        _same_prediction(next(pool.map("predict", [images[:8]])), clf.predict(images[:8]))  # stale results skipped
        with pytest.raises(ValueError, match="unknown method 'train'"):
            next(pool.map("train", [images[:8]]))
        with pytest.raises(ValueError, match="must be a module-level function"):  # would be lost in the queue
            next(pool.map(lambda clf, batch: clf.predict(batch), [images[:8]]))
    with pytest.raises(RuntimeError, match="closed"):
        next(pool.map("predict", [images[:8]]))


def test_core_pool_workers_leave_ctrl_c_to_the_caller(run: Path, images: torch.Tensor) -> None:
    """Ctrl-C in a terminal reaches every process of the group: the workers ignore it (no traceback from each), and
    the caller's own handling stops the pool."""
    clf = AdaptiveClassifier.load(run)
    with CorePool(clf, processes=2, batch_size=8) as pool:
        for w in pool._workers:
            os.kill(w.pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(w.is_alive() for w in pool._workers)
        _same_prediction(next(pool.map("predict", [images[:8]])), clf.predict(images[:8]))


def _megabyte_answer(clf, batch: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(batch), 2**18)  # 1 MiB per image: two answers fill a pipe


def test_core_pool_closes_promptly_when_its_caller_stops_reading(run: Path, images: torch.Tensor) -> None:
    """A map abandoned part-way (Ctrl-C, an error) leaves answers nobody reads: closing must not wait for them."""
    pool = CorePool(AdaptiveClassifier.load(run), processes=2, batch_size=8)
    answers = pool.map(_megabyte_answer, [images[i : i + 1] for i in range(16)])
    assert next(answers).shape == (1, 2**18)
    time.sleep(1)  # the workers answer the tasks in flight, which fills the pipe
    t0 = time.perf_counter()
    pool.close()
    assert time.perf_counter() - t0 < 4  # each worker was joined, not killed after its 5 s


def test_core_pool_refuses_a_classifier_off_the_cpu(run: Path) -> None:
    clf = AdaptiveClassifier.load(run)
    clf.backbone.to("meta")  # no GPU needed to be somewhere else
    with pytest.raises(ValueError, match="runs on CPU cores; this classifier is on meta"):
        CorePool(clf, processes=2)


def test_core_pool_names_a_dead_worker_instead_of_waiting_forever(run: Path, images: torch.Tensor) -> None:
    pool = CorePool(AdaptiveClassifier.load(run), processes=2, batch_size=8)
    os.kill(pool._workers[0].pid, signal.SIGKILL)
    pool._workers[0].join()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"worker died \(exit code -9\)"):
        list(pool.map("predict", [images[i : i + 8] for i in range(0, 64, 8)]))
    assert time.perf_counter() - t0 < 30 and not pool._workers  # closed, the other worker stopped


def test_benchmark_with_worker_processes_takes_the_full_settings_faster_way(run: Path, tmp_path) -> None:
    path = tmp_path / "bench.json"
    r = _cli("-m", "policy.benchmark", "--policy", str(run), "--limit", "64", "--limit-batch1", "4", "--repeats", "2",
             "--batch-sizes", "16", "1", "--processes", "2", "--matmul-size", "128", "--json", str(path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    pooled, single = json.loads(path.read_text())["rows"]
    assert (pooled["processes"], single["processes"]) == (2, 1) and "full_pool_img_s_runs" not in single
    ways = zip(pooled["full_pool_img_s_runs"], pooled["full_in_process_img_s_runs"], strict=True)
    fastest = [max(a, b) for a, b in ways]
    assert pooled["full_img_s_runs"] == fastest and pooled["full_img_s"] == statistics.median(fastest)
    ratios = [a / f for a, f in zip(pooled["adaptive_img_s_runs"], fastest, strict=True)]
    assert pooled["speedup"] == pytest.approx(statistics.median(ratios))
    here = zip(pooled["adaptive_in_process_img_s_runs"], pooled["full_in_process_img_s_runs"], strict=True)
    assert pooled["speedup_in_process"] == pytest.approx(statistics.median([a / f for a, f in here]))
    assert "in this process alone, same passes" in r.stdout
