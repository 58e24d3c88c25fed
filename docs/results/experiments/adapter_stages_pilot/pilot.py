"""Pilot for issue 18: adapter depth / stem exits as a 4th adaptivity axis of the AdaPerceiver.

    cd /work/pilot18 && PYTHONPATH=. python docs/results/experiments/adapter_stages_pilot/pilot.py \
        --epochs 3 --stage-proj pool1x1 --grans 2,4,8,16,32 --widths 16,32,64,128 \
        --sandwich --distill-weight 0.5 --seed 0 --out runs/adapter_stages/A

Model (:class:`StagedAdaPerceiver`, a subclass of ``backbone.model.AdaPerceiver``): the shipped conv stem has three
3x3 conv + GELU stages (1->16 ch at 28x28, 16->32 at 14x14, 32->64 at 7x7). After stage s a light projection maps
that stage's feature map to the same 7x7 grid of 64-wide patch tokens the read attends to:

* stage 1 (16 ch, 28x28): ``pool1x1`` = 4x4 average pool then 1x1 conv 16->64 (0.10 MFLOPs), or
  ``conv`` = 4x4 stride-4 conv 16->64 (1.61 MFLOPs);
* stage 2 (32 ch, 14x14): ``pool1x1`` = 2x2 average pool then 1x1 conv 32->64 (0.20 MFLOPs), or
  ``conv`` = 2x2 stride-2 conv 32->64 (0.80 MFLOPs);
* stage 3 (64 ch, 7x7): the shipped 1x1 projection (0.40 MFLOPs).

The patch context, position embedding, read, latents, blocks, write and head are shared by all stages. A setting is
(stage, tokens, depth, FFN width).

Training (per step, batch B): each sample draws one FFN width (``backbone.train.sample_widths``).
  * ``--sandwich`` (default): loss = joint_loss(every image at the deepest stage)
                                  + shallow_weight * joint_loss(every image at a random shallower stage, drawn per sample
                                    with ``--stage-weights``, same width as in the deep pass)
    ``joint_loss`` is the shipped loss over every token granularity and every depth (depth-weighted).
    In-place distillation (``--distill-weight a``): the shallow term is ``(1 - a) * CE + a * KL(teacher || student)``
    at temperature 1 (``joint_loss``'s own mix), teacher = the deep pass's logits at (deepest stage, max tokens,
    full depth) at the *same sample's width*, detached. With a = 0.5 this is 0.5*CE + 0.5*KL. (The teacher is
    the full setting only for the quarter of samples that drew width 128; a width-128 teacher for every sample
    would need a third pass.)
  * ``--no-sandwich``: one pass, each sample at a random stage (``--stage-weights`` over all stages), plain joint
    loss.
Optimiser and schedule are the shipped ones (timm AdamW, wd 0.05, cosine with 1 warm-up epoch, grad clip 1).

Evaluation: every (stage, tokens, depth, width) setting on the validation set (``policy-train`` first 5000 images =
train[50000:55000]; never the test split) with ``forward_all`` per (stage, width). Writes ``results.json`` (every
setting's accuracy and analytic FLOPs, the FlopCounterMode check, train wall time, per-step time, config) and
prints the smallest/full settings, the best per stage and the Pareto front with standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from backbone.config import AdaPerceiverConfig
from backbone.data import load_split
from backbone.factory import create_model
from backbone.flops import flop_counter, flops_breakdown
from backbone.model import AdaPerceiver, PatchMemory
from backbone.pareto import pareto_front
from backbone.train import joint_loss, sample_widths

NUM_STAGES = 3


class StagedAdaPerceiver(AdaPerceiver):
    """AdaPerceiver whose patch tokens can come from stage 1, 2 or 3 of the conv stem (``stage`` = 1..3)."""

    def __init__(self, cfg: AdaPerceiverConfig, stage_proj: str = "pool1x1") -> None:
        super().__init__(cfg)
        if cfg.stem != "conv" or len(cfg.stem_dims) != NUM_STAGES or cfg.conv_stem_strides != (1, 2, 2):
            raise ValueError("StagedAdaPerceiver expects the shipped 3-stage conv stem (strides 1, 2, 2)")
        if stage_proj not in ("pool1x1", "conv"):
            raise ValueError(f"stage_proj must be pool1x1 or conv, got {stage_proj!r}")
        self.stage_proj = stage_proj
        t, (c1, c2, _) = cfg.token_dim, cfg.stem_dims
        # downsampling from each shallow stage's map to the patch grid: stage 1 is at 28x28 (x4), stage 2 at 14x14 (x2)
        self.stage_factors = (4, 2)
        projs = []
        for c, f in zip((c1, c2), self.stage_factors, strict=True):
            if stage_proj == "pool1x1":
                projs.append(nn.Sequential(nn.AvgPool2d(f), nn.Conv2d(c, t, 1)))
            else:
                projs.append(nn.Conv2d(c, t, f, stride=f))
        self.stage_projs = nn.ModuleList(projs)  # stage 3 uses the shipped self.stem.proj

    # --- stem ---------------------------------------------------------------------------------------------------
    def stage_tokens(self, x: torch.Tensor, upto: int = NUM_STAGES, last_only: bool = False) -> list[torch.Tensor]:
        """Patch tokens ``(B, P, token_dim)`` of stages 1..upto (before patch context / position embedding).

        ``last_only`` projects stage ``upto`` alone (a single-stage forward pays only its own projection) and
        returns a one-element list.
        """
        self.check_input(x)
        h = (x - self.mean) / self.std
        convs = self.stem.convs  # [conv, GELU] * 3
        out = []
        for s in range(upto):
            h = convs[2 * s + 1](convs[2 * s](h))
            if last_only and s < upto - 1:
                continue
            proj = self.stage_projs[s] if s < NUM_STAGES - 1 else self.stem.proj
            out.append(proj(h).flatten(2).transpose(1, 2))
        return out

    def memory_from_tokens(self, tokens: torch.Tensor) -> PatchMemory:
        """Shared part after the stem: patch context, position embedding, the read's keys/values."""
        tokens = self.patch_context(tokens) + self.pos_embed
        k, v = self.read.project_kv(tokens)
        return PatchMemory(tokens, k=k, v=v)

    def embed_stage(self, x: torch.Tensor, stage: int = NUM_STAGES) -> PatchMemory:
        """``embed`` with the tokens of one stem stage (stage 3 = the shipped model's ``embed``)."""
        return self.memory_from_tokens(self.stage_tokens(x, stage, last_only=True)[0])

    def forward_stage(self, x: torch.Tensor, stage: int, num_tokens=None, depth=None, width=None) -> torch.Tensor:
        """Logits at one (stage, tokens, depth, width) setting."""
        return self.forward(self.embed_stage(x, stage), num_tokens, depth, width)

    # --- compute ------------------------------------------------------------------------------------------------
    def stage_flops_breakdown(self, stage: int, num_tokens: int, depth: int, width: int) -> dict[str, int]:
        """``backbone.flops.flops_breakdown`` with the stem cut after ``stage`` and that stage's projection."""
        cfg = self.cfg
        parts = flops_breakdown(cfg, num_tokens, depth, width)
        p, t = cfg.num_patches, cfg.token_dim
        embed, side = 0, cfg.img_size
        chans = (cfg.in_chans, *cfg.stem_dims)
        for s in range(stage):
            side = -(-side // cfg.conv_stem_strides[s])
            embed += 2 * side * side * 9 * chans[s] * chans[s + 1]
        c = cfg.stem_dims[stage - 1]
        if stage == NUM_STAGES:
            embed += 2 * p * c * t  # shipped 1x1 projection
        elif self.stage_proj == "pool1x1":
            embed += 2 * p * c * t  # average pooling is element-wise (not counted), then 1x1 conv
        else:
            f = self.stage_factors[stage - 1]
            embed += 2 * p * c * f * f * t
        embed += 2 * p * t * cfg.patch_context_kernel**2
        parts["embed"] = embed
        return parts

    def stage_flops(self, stage: int, num_tokens: int, depth: int, width: int) -> int:
        return sum(self.stage_flops_breakdown(stage, num_tokens, depth, width).values())


# --- training ---------------------------------------------------------------------------------------------------
def train(model: StagedAdaPerceiver, args, images: torch.Tensor, labels: torch.Tensor, log_path: Path) -> dict:
    n = len(images)
    steps_per_epoch = n // args.batch_size
    total = steps_per_epoch * args.epochs
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total, lr_min=args.min_lr, warmup_t=int(args.warmup_epochs * steps_per_epoch),
        warmup_lr_init=args.lr * 0.01, t_in_epochs=False,
    )  # fmt: skip
    widths = torch.tensor(model.cfg.widths)
    sw = torch.tensor(args.stage_weights, dtype=torch.float)
    if args.sandwich:
        if len(sw) != NUM_STAGES - 1:
            raise ValueError(f"--stage-weights needs {NUM_STAGES - 1} weights (stages 1..2) with --sandwich")
    elif len(sw) != NUM_STAGES:
        raise ValueError(f"--stage-weights needs {NUM_STAGES} weights (stages 1..3) with --no-sandwich")
    log = log_path.open("w")
    model.train()
    elapsed, step_times, loss_ema = 0.0, [], None
    for step in range(total):
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 1_000_003 - 1 - epoch))
        idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
        torch.manual_seed(args.seed * 1_000_003 + step)
        t0 = time.perf_counter()
        x, y = images[idx].float() / 255.0, labels[idx]
        w = sample_widths(widths, len(idx))
        scheduler.step_update(num_updates=step)
        stages = torch.multinomial(sw, len(idx), replacement=True) + 1  # per-sample stage
        toks = model.stage_tokens(x)
        parts = {}
        if args.sandwich:
            deep = model.forward_all(model.memory_from_tokens(toks[-1]), width=w)
            parts["deep"] = joint_loss(deep, y)
            shallow_tok = torch.where((stages == 1)[:, None, None], toks[0], toks[1])
            shallow = model.forward_all(model.memory_from_tokens(shallow_tok), width=w)
            teacher = deep[:, -1, -1].detach() if args.distill_weight > 0 else None
            parts["shallow"] = args.shallow_weight * joint_loss(
                shallow, y, teacher_logits=teacher, distill_weight=args.distill_weight, temperature=1.0
            )
        else:
            sel = torch.stack(toks, 0)[stages - 1, torch.arange(len(idx))]
            parts["mixed"] = joint_loss(model.forward_all(model.memory_from_tokens(sel), width=w), y)
        loss = sum(parts.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is not finite at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        dt = time.perf_counter() - t0
        elapsed += dt
        step_times.append(dt)
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        rec = {"step": step + 1, "loss": round(loss.item(), 4), **{k: round(v.item(), 4) for k, v in parts.items()},
               "lr": optimizer.param_groups[0]["lr"], "step_s": round(dt, 3), "wall_s": round(elapsed, 1)}  # fmt: skip
        if (step + 1) % steps_per_epoch == 0 and args.monitor:
            rec.update(monitor(model, args))
            model.train()
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if step < 5 or (step + 1) % 20 == 0 or "mon" in str(rec):
            print(f"step {step + 1}/{total} loss_ema {loss_ema:.3f} step {dt:.2f}s wall {elapsed:.0f}s "
                  + " ".join(f"{k}={v}" for k, v in rec.items() if k.startswith("mon")), flush=True)  # fmt: skip
    log.close()
    st = np.array(step_times)
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "train_wall_s": round(elapsed, 1),
            "step_s_median": float(np.median(st)), "step_s_mean": float(st.mean()),
            "step_s_median_after_10": float(np.median(st[10:])) if len(st) > 10 else float(np.median(st))}  # fmt: skip


@torch.no_grad()
def monitor(model: StagedAdaPerceiver, args) -> dict:
    """Progress signal on 1000 validation images: full setting and smallest setting."""
    model.eval()
    val = load_split("policy-train").subset(1000)
    x, y = val.as_float(), val.labels
    c = model.cfg
    full = model.forward_stage(x, NUM_STAGES).argmax(-1)
    small = model.forward_stage(x, 1, c.token_granularities[0], 1, c.widths[0]).argmax(-1)
    return {"mon_full": (full == y).float().mean().item(), "mon_small": (small == y).float().mean().item()}


# --- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: StagedAdaPerceiver, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Per-image correctness ``(n, stages, K, L, M)`` of every setting, via ``forward_all`` per (stage, width)."""
    model.eval()
    c = model.cfg
    k, depth, m = len(c.token_granularities), c.depth, len(c.widths)
    correct = np.zeros((len(images), NUM_STAGES, k, depth, m), bool)
    for s0 in range(0, len(images), batch):
        x, y = images[s0 : s0 + batch], labels[s0 : s0 + batch]
        toks = model.stage_tokens(x)
        for s in range(NUM_STAGES):
            mem = model.memory_from_tokens(toks[s])
            for j, w in enumerate(c.widths):
                pred = model.forward_all(mem, width=w).argmax(-1)  # (b, K, L)
                correct[s0 : s0 + len(x), s, :, :, j] = (pred == y[:, None, None]).numpy()
    return correct


def flops_check(model: StagedAdaPerceiver) -> list[dict]:
    """Analytic FLOPs vs FlopCounterMode on a real batch-1 forward at the smallest and the full setting."""
    c = model.cfg
    x = torch.rand(1, c.in_chans, c.img_size, c.img_size)
    out = []
    for name, (s, g, d, w) in {"smallest": (1, c.token_granularities[0], 1, c.widths[0]),
                               "full": (NUM_STAGES, c.max_tokens, c.depth, c.widths[-1]),
                               "stage2_full": (2, c.max_tokens, c.depth, c.widths[-1])}.items():  # fmt: skip
        counter = flop_counter()
        with counter:  # autograd on: see backbone.flops.measure_flops
            model.forward_stage(x, s, g, d, w)
        measured = counter.get_total_flops()
        analytic = model.stage_flops(s, g, d, w)
        out.append({"setting": name, "stage": s, "tokens": g, "depth": d, "width": w, "analytic": analytic,
                    "flop_counter": measured, "rel_diff": (analytic - measured) / measured})  # fmt: skip
    return out


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of paired correctness vectors (as policy/evaluation.py's ``mcnemar_p``)."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def summarise(model: StagedAdaPerceiver, correct: np.ndarray) -> dict:
    c = model.cfg
    n, acc = len(correct), correct.mean(0)
    rows = []
    for s in range(NUM_STAGES):
        for ki, g in enumerate(c.token_granularities):
            for d in range(c.depth):
                for j, w in enumerate(c.widths):
                    rows.append({"stage": s + 1, "tokens": g, "depth": d + 1, "width": w,
                                 "flops": model.stage_flops(s + 1, g, d + 1, w), "accuracy": float(acc[s, ki, d, j])})  # fmt: skip
    se = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731
    front = pareto_front([r["flops"] for r in rows], [r["accuracy"] for r in rows]).tolist()
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    front_rows = [dict(rows[i], se=se(rows[i]["accuracy"])) for i in front]
    # steps along the front whose accuracy gain over the previous front point exceeds the new point's SE
    sig_steps = sum(1 for a, b in zip(front_rows, front_rows[1:]) if b["accuracy"] - a["accuracy"] > b["se"])
    # greedy chain from the cheapest front point: each next point more accurate than the last chosen by > its SE
    # (and a stricter chain at 1.96 * sqrt(se_a^2 + se_b^2), an unpaired two-sided 5% test)
    chains = {}
    for name, gap in {"se": lambda a, b: b["se"],
                      "z1.96": lambda a, b: 1.96 * math.sqrt(a["se"] ** 2 + b["se"] ** 2)}.items():  # fmt: skip
        chain = [front_rows[0]]
        for r in front_rows[1:]:
            if r["accuracy"] - chain[-1]["accuracy"] > gap(chain[-1], r):
                chain.append(r)
        chains[name] = [(r["stage"], r["tokens"], r["depth"], r["width"]) for r in chain]
    # paired test (same images): McNemar between consecutive front points, and a greedy chain at p < 0.05
    cor = lambda r: correct[:, r["stage"] - 1, c.token_granularities.index(r["tokens"]), r["depth"] - 1,  # noqa: E731
                            c.widths.index(r["width"])]  # fmt: skip
    for a, b in zip(front_rows, front_rows[1:]):
        b["mcnemar_p_vs_prev"] = mcnemar(cor(b), cor(a))
    chain = [front_rows[0]]
    for r in front_rows[1:]:
        if mcnemar(cor(r), cor(chain[-1])) < 0.05:
            chain.append(r)
    chains["mcnemar_p0.05"] = [(r["stage"], r["tokens"], r["depth"], r["width"]) for r in chain]
    key = lambda s, g, d, w: next(r for r in rows if (r["stage"], r["tokens"], r["depth"], r["width"]) == (s, g, d, w))  # noqa: E731
    smallest = key(1, c.token_granularities[0], 1, c.widths[0])
    full = key(NUM_STAGES, c.max_tokens, c.depth, c.widths[-1])
    best_per_stage = {s: max((r for r in rows if r["stage"] == s), key=lambda r: r["accuracy"]) for s in (1, 2, 3)}
    full_per_stage = {s: key(s, c.max_tokens, c.depth, c.widths[-1]) for s in (1, 2, 3)}
    sig_paired = sum(1 for r in front_rows[1:] if r["mcnemar_p_vs_prev"] < 0.05)
    return {"rows": rows, "front": front_rows, "front_significant_steps_se": sig_steps,
            "front_significant_steps_mcnemar": sig_paired, "chains": chains,
            "smallest": smallest, "full": full, "rise": full["accuracy"] - smallest["accuracy"],
            "smallest_flops_share": smallest["flops"] / full["flops"],
            "best_per_stage": best_per_stage, "full_per_stage": full_per_stage}  # fmt: skip


def fmt(r: dict) -> str:
    return (f"stage {r['stage']} {r['tokens']}/{r['depth']}/{r['width']}: {100 * r['accuracy']:.2f}% "
            f"at {r['flops'] / 1e6:.2f} MFLOPs")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--stage-proj", choices=["pool1x1", "conv"], default="pool1x1")
    p.add_argument("--grans", default="2,4,8,16,32", help="token granularities")
    p.add_argument("--widths", default="16,32,64,128", help="FFN widths (last = embed_dim)")
    p.add_argument("--sandwich", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--distill-weight", type=float, default=0.5, help="KL share of the shallow-stage loss")
    p.add_argument("--stage-weights", default="", help="sampling weights of the shallow stages (1,2) with "
                   "--sandwich, of all stages (1,2,3) without; default uniform")  # fmt: skip
    p.add_argument("--shallow-weight", type=float, default=1.0, help="weight of the shallow-stage term (sandwich)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--limit-train", type=int, default=0, help="train on the first n images only (smoke tests)")
    p.add_argument("--limit-val", type=int, default=5000, help="validation images (train[50000:50000+n])")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-only", action="store_true", help="skip training: evaluate OUT/model.pt and rewrite "
                   "OUT/results.json, keeping its recorded training info")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grans = tuple(int(v) for v in args.grans.split(","))
    widths = tuple(int(v) for v in args.widths.split(","))
    n_w = NUM_STAGES - 1 if args.sandwich else NUM_STAGES
    args.stage_weights = [float(v) for v in args.stage_weights.split(",")] if args.stage_weights else [1.0] * n_w
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    base = create_model("adaperceiver_fmnist", token_granularities=grans, widths=widths)
    model = StagedAdaPerceiver(base.cfg, args.stage_proj)
    import backbone

    print(f"backbone from {backbone.__file__}; threads {torch.get_num_threads()}", flush=True)
    check = flops_check(model)
    for r in check:
        print(f"FLOPs {r['setting']}: analytic {r['analytic']:,} vs FlopCounterMode {r['flop_counter']:,} "
              f"({100 * r['rel_diff']:+.2f}%)", flush=True)  # fmt: skip

    train_data = load_split("backbone-train")
    if args.limit_train:
        train_data = train_data.subset(args.limit_train)
    t0 = time.time()
    if args.eval_only:
        model.load_state_dict(torch.load(out / "model.pt", map_location="cpu"))
        old = json.loads((out / "results.json").read_text())
        info, t0 = old["train"], t0 - old["total_wall_s"] + old["eval_wall_s"]
    else:
        old = None
        info = train(model, args, train_data.images, train_data.labels, out / "log.jsonl")
        torch.save(model.state_dict(), out / "model.pt")
    val = load_split("policy-train").subset(args.limit_val)
    t1 = time.time()
    correct = evaluate(model, val.as_float(), val.labels)
    eval_s = time.time() - t1
    summ = summarise(model, correct)
    result = {"config": {**vars(args), "grans": grans, "widths": widths, "model_config": model.cfg.to_dict()},
              "command": old["command"] if args.eval_only else " ".join(sys.argv),
              "eval_command": " ".join(sys.argv) if args.eval_only else None, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "train": info, "total_wall_s": round(time.time() - t0, 1), "eval_wall_s": round(eval_s, 1),
              "val_images": len(val), "flops_check": check, **summ}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))

    print(f"\ntrain {info['train_wall_s']:.0f} s ({info['steps']} steps, median {info['step_s_median']:.2f} s/step, "
          f"{torch.get_num_threads()} thread(s)); eval {eval_s:.0f} s on {len(val)} validation images")  # fmt: skip
    print("smallest:", fmt(summ["smallest"]), f"({100 * summ['smallest_flops_share']:.2f}% of full FLOPs)")
    print("full:    ", fmt(summ["full"]))
    print(f"rise full - smallest: {100 * summ['rise']:+.2f} points")
    for s in (1, 2, 3):
        print(f"stage {s}: best {fmt(summ['best_per_stage'][s])}; full-tokens/depth/width {fmt(summ['full_per_stage'][s])}")
    print(f"Pareto front ({len(summ['front'])} points):")
    prev = None
    for r in summ["front"]:
        gain = "" if prev is None else f"  +{100 * (r['accuracy'] - prev['accuracy']):.2f}"
        mark = " *" if prev is not None and r["accuracy"] - prev["accuracy"] > r["se"] else ""
        pval = f"  McNemar p={r['mcnemar_p_vs_prev']:.3g}" if prev is not None else ""
        print(f"  {fmt(r)} +- {100 * r['se']:.2f}{gain}{mark}{pval}")
        prev = r
    print(f"front steps more accurate than the previous front point by > its SE: {summ['front_significant_steps_se']}")
    print(f"front steps with McNemar p < 0.05 vs the previous front point: {summ['front_significant_steps_mcnemar']}")
    for name, chain in summ["chains"].items():
        print(f"greedy significant chain ({name}): {len(chain)} settings: {chain}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
