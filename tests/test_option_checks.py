"""Numeric options out of range are one-line errors before any work starts: every command's flags, and the fields of
the backbone's and the controller's configs (``backbone.option_checks``)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from backbone.option_checks import check_int, check_number, int_at_least
from backbone.training import TrainConfig
from policy.config import build_policy_config

RUN = "docs/results/demo_p0.3"

# (module, the arguments a run needs, a flag, a bad value): each failed late, or not at all, before the check
BAD_FLAGS = [
    ("policy.benchmark", ["--policy", RUN], "--repeats", "0"),  # statistics error after the first timed pass
    ("policy.benchmark", ["--policy", RUN], "--batch-sizes", "0"),  # range() error after the matmul benchmark
    ("backbone.evaluate", [], "--batch-size", "-1"),  # an empty sweep reported as a result, exit 0
    ("envs.build_tables", ["--split", "test"], "--chunk-size", "0"),
    ("envs.build_tables", ["--split", "test"], "--limit", "-5"),
    ("policy.cli", [], "--n-envs", "0"),
    ("policy.cli", [], "--train-limit", "-1"),
    ("policy.infer", ["--policy", RUN, "images"], "--batch-size", "0"),
    ("policy.ablation", [], "--seeds", "-1"),
    ("policy.reference", [], "--hidden", "0"),
    ("policy.recipe_cv", ["--variants", "ent_coef=0"], "--timesteps", "0"),
    ("backbone.read_attention", [], "--samples", "0"),
    ("benchmarks.bench_backbone", [], "--matmul-size", "0"),
    ("benchmarks.bench_env", [], "--steps", "0"),
    ("benchmarks.bench_train_step", [], "--repeats", "0"),
    ("benchmarks.compile_front", ["--policy", RUN], "--images", "0"),
    ("benchmarks.aot_batch1", ["--policy", RUN], "--images", "0"),
    ("benchmarks.profile_adaptive", ["--policy", RUN], "--rows", "0"),
    ("benchmarks.stem_layout", ["--policy", RUN], "--batch-size", "0"),
    ("policy.benchmark", ["--policy", RUN], "--threads", "two"),
    ("backbone.deepen_stem", ["--out", "never.safetensors"], "--channels", "0"),
    ("policy.iso_holdout", [], "--folds", "1"),
]


def test_no_command_takes_an_integer_flag_without_a_range() -> None:
    """Every integer flag is parsed by ``int_at_least`` (the list above samples them; this catches a new one)."""
    repo = Path(__file__).resolve().parent.parent
    sources = [p for d in ("backbone", "envs", "policy", "benchmarks", "scripts") for p in (repo / d).rglob("*.py")]
    plain = [f"{p.relative_to(repo)}:{n}" for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"(?<![a-z_])type=int\b(?!_)", line)]  # fmt: skip
    assert len(sources) > 50 and not plain, plain


@pytest.mark.parametrize(("module", "needed", "flag", "value"), BAD_FLAGS)
def test_every_command_refuses_an_out_of_range_count_in_one_line(module, needed, flag, value, capsys) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as done:
        main([*needed, flag, value])
    assert done.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and f"argument {flag}: must be an integer >=" in error[0], error


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", -1, "epochs must be an integer >= 1"),  # was an AssertionError inside timm's scheduler
        ("epochs", 1.5, "epochs must be an integer >= 1"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("checkpoint_every", 0, "checkpoint_every must be an integer >= 1"),  # was a modulo by zero mid-run
        ("lr", float("nan"), "lr must be a finite number >= 0"),
        ("warmup_epochs", -0.5, "warmup_epochs must be a finite number >= 0"),
        ("label_smoothing", 1.0, "label_smoothing must be a finite number >= 0 and < 1"),
        ("policy_fraction", 0.0, "policy_fraction must be a finite number > 0 and < 1"),
        ("limit_train", -1, "limit_train must be an integer >= 0"),
        ("augment", "maybe", "augment must be true or false"),  # a truthy string would have turned it on
        ("wandb", "sometimes", "wandb must be one of"),
    ],
)
def test_train_config_refuses_out_of_range_fields(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_backbone_train_command_refuses_a_bad_field_before_loading_data(capsys) -> None:
    from backbone.train import main

    assert main(["epochs=-1", "--out", "/nonexistent/never-written"]) == 2
    assert capsys.readouterr().err.strip() == "error: epochs must be an integer >= 1, got -1"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0"),
        ("gamma", 1.5, "gamma must be a finite number >= 0 and <= 1"),
        ("clip_range", -0.2, "clip_range must be a finite number > 0"),
        ("ent_coef", -0.001, "ent_coef must be a finite number >= 0"),
        ("net_arch", [64, 0], "each net_arch size must be an integer >= 1"),
        ("net_arch", [], "net_arch must be a non-empty list"),
        ("timesteps", "1e5", "timesteps must be an integer >= 1"),  # YAML reads 1e5 as a string
        ("seed", -1, "seed must be an integer >= 0"),
        ("device", "gpu0", "device 'gpu0': not a torch device"),  # was a RuntimeError traceback
        ("table_device", "nope" if torch.cuda.is_available() else "cuda:0", "device '"),  # a CUDA-init traceback
    ],
)
def test_policy_config_refuses_out_of_range_fields(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_policy_config(**{field: value})


def test_checks_accept_the_edges_of_their_ranges() -> None:
    check_int("n", 0)
    check_int("n", 1, 1)
    check_number("x", 0.0)
    check_number("x", 1, 0.0, 1.0)
    assert int_at_least(0)("0") == 0 and int_at_least(2)("2") == 2
    TrainConfig(lr=0.0, epochs=1, label_smoothing=0.0, distill_weight=1.0)  # lr 0: fine-tuning's identity check
    build_policy_config(gamma=1.0, gae_lambda=0.0, ent_coef=0.0, checkpoint_every=0)
    for bad in (True, 2.0, "1"):
        with pytest.raises(ValueError):
            check_int("n", bad)
    for bad in (float("inf"), True, "0.5", -1e-9):
        with pytest.raises(ValueError):
            check_number("x", bad)


def test_ablation_refuses_a_headline_penalty_it_would_not_train(capsys) -> None:
    """A headline penalty outside the sweep used to leave the headline row and the allocation plot silently empty."""
    from policy.ablation import main

    assert main(["--penalties", "0.1", "1", "--headline-penalty", "0.3", "--out", "/nonexistent/never-written"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --headline-penalty 0.3 is not one of the penalties [0.1, 1.0]; add it to --penalties"
    )
