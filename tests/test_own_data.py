"""Your own images, end to end (issue 19, part 2): an image folder the test writes, through every command.

``ROOT/<split>/<class>/<image>`` with only ``train/`` and ``test/``: the backbone holds out part of ``train/`` for
the controller and records it; the outcome tables, ``train_policy.py``, the ablation and ``policy.infer`` then run
from the command line on exactly that split. Bad input is a one-line error with nothing written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backbone import load_backbone
from backbone.config import AdaPerceiverConfig
from backbone.data_source import resolve_data
from backbone.folder_split import FolderSplit, preprocessing
from backbone.holdout import stratified_holdout
from envs import AdaPerceiverComputeEnv, OutcomeTable, table_chunks

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("band0", "band1", "band2")
SMALL_PPO = {"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 2, "timesteps": 256, "net_arch": [16, 16]}
# a recipe that fits the 42 training images in a second: the test model with LayerScale 1 and a high learning rate
TRAIN = ("model=adaperceiver_test", "model_overrides.num_classes=3", "model_overrides.ls_init_values=1.0", "lr=1e-2",
         "epochs=1", "batch_size=8", "min_steps=150", "small_data=0", "workers=0")  # fmt: skip


def _image(cls: int, i: int, rng: np.random.Generator) -> Image.Image:
    """28x28 gray noise plus a bright bar whose height names the class (its horizontal position varies)."""
    px = rng.integers(0, 50, (28, 28)).astype(np.uint8)
    px[4 + 8 * cls : 10 + 8 * cls, i % 6 : 18 + i % 6] = 255
    return Image.fromarray(px, "L")


def write_folder(root: Path, counts: dict[str, int], classes=CLASSES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _image(c, i, rng).save(root / split / name / f"{split}{i:02d}.png")
    return root


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "ADAPERCEIVER_CACHE_DIR": str(cache)}  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict:
    """Every command once, from the command line, on a generated 3-class folder (timed: the CI budget is 2 min)."""
    work = tmp_path_factory.mktemp("own_data")
    root = write_folder(work / "shapes", {"train": 16, "test": 6})
    cache = work / "cache"
    (work / "ppo.yaml").write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/policy.yaml").read_text()),
                                                   **SMALL_PPO}))  # fmt: skip
    t0 = time.perf_counter()
    out = {"root": root, "cache": cache, "work": work, "runs": {}}
    steps = {
        "train": ("-m", "backbone.train", "--data", str(root), *TRAIN, "--out", str(work / "bb")),
        "tables": ("-m", "envs.build_tables", "--backbone", str(work / "bb/backbone.safetensors"), "--data", str(root),
                   "--workers", "0", "--batch-size", "5"),
        "policy": ("train_policy.py", "--data", str(root), "--backbone", str(work / "bb/backbone.safetensors"),
                   "--config", str(work / "ppo.yaml"), "--workers", "0", "--out", str(work / "p0.3"), "--no-progress"),
        "ablation": ("-m", "policy.ablation", "--data", str(root), "--backbone", str(work / "bb/backbone.safetensors"),
                     "--penalties", "0.3", "--policies", str(work / "p0.3"), "--controllers", "oneshot",
                     "--workers", "0", "--runs-dir", str(work / "abl"), "--out", str(work / "report")),
        "evaluate": ("-m", "backbone.evaluate", "--checkpoint", str(work / "bb/backbone.safetensors"), "--data",
                     str(root), "--split", "policy-train", "--workers", "0", "--out", str(work / "eval")),
        "benchmark": ("-m", "policy.benchmark", "--policy", str(work / "p0.3"), "--limit", "12", "--limit-batch1", "4",
                      "--repeats", "1", "--workers", "0", "--json", str(work / "bench.json")),
        "infer": ("-m", "policy.infer", "--policy", str(work / "p0.3"), str(root / "test"), "--json",
                  str(work / "infer.json")),
    }  # fmt: skip
    for name, args in steps.items():
        out["runs"][name] = _cli(*args, cache=cache)
        assert out["runs"][name].returncode == 0, (name, out["runs"][name].stderr[-2000:])
    out["wall_s"] = time.perf_counter() - t0
    return out


def test_backbone_records_the_stratified_policy_holdout(pipeline) -> None:
    model = load_backbone(pipeline["work"] / "bb/backbone.safetensors")
    info = model.checkpoint_info
    assert info["classes"] == list(CLASSES)
    held = info["data"]["policy_split"]["files"]
    assert len(held) == 6 and {f.split("/")[0] for f in held} == set(CLASSES)  # round(0.1 * 16) = 2 per class
    assert info["data"]["train_images"] == 42 == len(info["data"]["train_sha256"])
    assert info["steps"] == 150  # min_steps raised 1 epoch of 5 steps to 30 epochs
    # the policy side reads exactly the held-out files, and the backbone-train split is the rest
    source = resolve_data(str(pipeline["root"]))
    policy = source.split("policy-train", model)
    assert sorted(r for r, _ in policy.samples) == sorted(held)
    trained = {r for r, _ in source.split("backbone-train", model).samples}
    assert not trained & set(held) and len(trained) == 42


def test_every_command_runs_on_the_image_folder(pipeline) -> None:
    runs, work = pipeline["runs"], pipeline["work"]
    assert "policy-train: 6 images" in runs["tables"].stdout and "test: 18 images" in runs["tables"].stdout
    metrics = json.loads((work / "p0.3/eval.json").read_text())
    assert metrics["samples"] == 18 and metrics["full_accuracy"] >= 0.8, metrics  # the shapes were learned
    assert metrics["accuracy"] >= 0.7, metrics
    side = json.loads((work / "p0.3/policy.json").read_text())
    assert side["data"] == str(pipeline["root"].resolve())
    ablation = json.loads((work / "report/ablation.json").read_text())
    assert not (work / "abl").exists()  # the given run is scored, nothing trained (a sequential one would take minutes)
    assert ablation["samples"] == 18 and ablation["controllers"][0]["accuracy"] == metrics["accuracy"]
    rows = json.loads((work / "infer.json").read_text())
    assert len(rows) == 18
    right = sum(r["class"] == Path(r["file"]).parent.name for r in rows)
    assert right >= 12, rows  # class names come from the backbone, and the predictions match the folders
    # the tables were built once (by envs.build_tables) and reused by train_policy.py and the ablation
    assert "outcome table" not in runs["policy"].stderr and "outcome table" not in runs["ablation"].stderr
    # backbone.evaluate and policy.benchmark read the same data (the benchmark takes it from the run's policy.json)
    evaluated = json.loads((work / "eval/eval_policy-train.json").read_text())
    assert evaluated["samples"] == 6 and evaluated["data"] == str(pipeline["root"])
    assert json.loads((work / "bench.json").read_text())["rows"][0]["images"] == 12
    print(f"own-data pipeline: {pipeline['wall_s']:.1f} s for 7 commands")


def test_environment_takes_data(pipeline) -> None:
    bb = pipeline["work"] / "bb/backbone.safetensors"
    env = AdaPerceiverComputeEnv(backbone=str(bb), data=str(pipeline["root"]), cache_dir=pipeline["cache"])
    live = AdaPerceiverComputeEnv(backbone=str(bb), data=str(pipeline["root"]), mode="live")
    assert env.n_samples == live.n_samples == 6
    for i in range(6):
        for action in (np.array([0, 0, 0]), np.array([2, 2, 2])):
            rewards = []
            for e in (env, live):
                e.reset(options={"sample_index": i})
                rewards.append(e.step(action)[1])
            assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)


def _main(module, argv, capsys) -> tuple[int, str]:
    rc = module.main(argv)
    return rc, capsys.readouterr().err.strip()


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if not line.startswith(("reading ", "outcome table "))]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_folders_are_one_line_errors_with_nothing_written(tmp_path, capsys) -> None:
    from backbone import train

    def run(root: Path, *extra: str) -> tuple[int, str]:
        return _main(train, ["--data", str(root), *TRAIN, *extra, "--out", str(tmp_path / "out")], capsys)

    empty = tmp_path / "empty"
    (empty / "train/a").mkdir(parents=True)
    (empty / "test/a").mkdir(parents=True)
    _one_line_error(*run(empty), "train", "no valid file")
    missing = write_folder(tmp_path / "missing", {"train": 4, "test": 2})
    shutil.rmtree(missing / "test/band2")
    _one_line_error(*run(missing), "'band2' is missing from", "test")
    corrupt = write_folder(tmp_path / "corrupt", {"train": 4, "test": 2})
    (corrupt / "train/band1/broken.png").write_bytes(b"not a png at all")
    _one_line_error(*run(corrupt), "broken.png", "unreadable image")
    _one_line_error(*run(missing, "model_overrides.num_classes=10"), "has 3 classes", "num_classes=3")
    _one_line_error(*_main(train, ["--data", str(tmp_path / "nowhere")], capsys), "neither a built-in task")
    assert not (tmp_path / "out").exists()


def test_policy_side_refusals(pipeline, tmp_path, capsys) -> None:
    from policy import cli

    bb = str(pipeline["work"] / "bb/backbone.safetensors")
    base = ["--backbone", bb, "--config", str(pipeline["work"] / "ppo.yaml"), "--workers", "0", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]  # fmt: skip
    # an explicit policy-train/ folder that contains one of the backbone's training images
    overlap = tmp_path / "overlap"
    shutil.copytree(pipeline["root"], overlap)
    write_folder(overlap, {"policy-train": 3}, seed=7)
    held = set(load_backbone(bb).checkpoint_info["data"]["policy_split"]["files"])
    trained = next(f"band1/train{i:02d}.png" for i in range(16) if f"band1/train{i:02d}.png" not in held)
    shutil.copy(overlap / "train" / trained, overlap / "policy-train/band1/copy.png")
    _one_line_error(*_main(cli, ["--data", str(overlap), *base], capsys), "copy.png", "training images")
    # the same folder without the copy is an explicit policy split the controller may use
    (overlap / "policy-train/band1/copy.png").unlink()
    table = resolve_data(str(overlap)).split("policy-train", load_backbone(bb))
    assert len(table) == 9 and all(r.startswith(CLASSES) for r, _ in table.samples)
    # other class names (same count), and the Fashion-MNIST task, are refused for this backbone
    renamed = write_folder(tmp_path / "renamed", {"train": 4, "test": 2}, classes=("a", "b", "c"))
    _one_line_error(*_main(cli, ["--data", str(renamed), *base], capsys), "trained on classes", "'band0'")
    _one_line_error(*_main(cli, ["--data", "fmnist", *base], capsys), "trained on classes", "Fashion-MNIST")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_holdout_is_deterministic_and_stratified() -> None:
    samples = [(f"{c}/{i:03d}.png", k) for k, c in enumerate("xyz") for i in range((k + 1) * 10)]
    held = stratified_holdout(samples, 0.2)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert stratified_holdout(shuffled, 0.2) == held  # listing order does not matter
    assert [sum(f.startswith(c) for f in held) for c in "xyz"] == [2, 4, 6]  # 20% of each class
    first_by_name = sorted(f"{c}/{i:03d}.png" for k, c in enumerate("xyz") for i in range(2 * (k + 1)))
    assert held != first_by_name  # mixed by hash, not the first files of each class by name
    assert set(stratified_holdout(samples, 0.1)) < set(held)  # a smaller fraction holds out a subset


def test_preprocessing_crops_like_the_backbone_config() -> None:
    wide = np.zeros((28, 56), np.uint8)
    wide[:, :14] = 255  # a bright left quarter: outside the centre crop
    img = Image.fromarray(wide, "L")
    cropped = preprocessing(AdaPerceiverConfig(resize_size=28))(img)
    squashed = preprocessing(AdaPerceiverConfig())(img)
    assert cropped.shape == squashed.shape == (1, 28, 28) and cropped.dtype == torch.uint8
    assert int(cropped.max()) == 0 and int(squashed[:, :, :6].min()) == 255
    rgb = preprocessing(AdaPerceiverConfig(in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3))(img)
    assert rgb.shape == (3, 28, 28)


class _Stop(Exception):
    pass


def test_chunked_table_resumes_after_an_interruption(pipeline, tmp_path, monkeypatch) -> None:
    model = load_backbone(pipeline["work"] / "bb/backbone.safetensors")
    split = resolve_data(str(pipeline["root"])).split("test", model)
    path = tmp_path / "test.npz"
    real, calls, stop_at = table_chunks._run_chunk, [], [3]

    def flaky(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == stop_at[0]:
            raise _Stop  # a crash or Ctrl-C in the third chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(table_chunks, "_run_chunk", flaky)
    with pytest.raises(_Stop):
        table_chunks.build_in_chunks(model, split, "test", "pooled_probe", path, batch_size=3, chunk_size=4)
    assert not path.exists() and len(list((tmp_path / "test.npz.parts").glob("chunk*.npz"))) == 2
    calls.clear()
    stop_at[0] = 0
    table = table_chunks.build_in_chunks(model, split, "test", "pooled_probe", path, batch_size=3, chunk_size=4)
    assert calls == [8, 12, 16] and path.is_file() and not (tmp_path / "test.npz.parts").exists()
    # equal to the in-memory build of the same images, and to the saved file
    images = split.read_all(progress=False)[0]
    ref = OutcomeTable.build(model, images, "test", "pooled_probe", progress=False)
    saved = OutcomeTable.load(path)
    for name in ("correct", "pred", "labels"):
        assert np.array_equal(getattr(table, name), getattr(ref, name)) and np.array_equal(
            getattr(saved, name), getattr(ref, name))  # fmt: skip
    for name in ("loss", "confidence", "obs"):
        np.testing.assert_allclose(getattr(table, name), getattr(ref, name), atol=1e-5)
    assert isinstance(split, FolderSplit) and table.data_sha256 == split.fingerprint()
