"""Batch-1 latency with ahead-of-time compiled paths (AOTInductor): the front and each chosen setting as one call.

At batch 1 eager PyTorch costs about as much per operator as the operators compute (a few microseconds of Python
and dispatch each, ~300 of them per image), so time follows the operator count, not the FLOPs, and the adaptive
path's 39x fewer FLOPs buy ~2x (``docs/results/profile/``). AOTInductor turns a static-shape graph into one
compiled C++ function, so the per-operator cost goes: the front (probe-stage embedding, probe, observation,
controller and its argmax) is one compiled call, and each setting the controller picks is one more, going on from
the front's work exactly as :meth:`policy.adaptive.AdaptiveClassifier.predict` does (the same reuse, so the same
FLOPs). The full setting is compiled the same way, so the speed-up is read against a compiled full model
(``python -m benchmarks.aot_batch1``).

A setting is compiled the first time the controller picks it (about 35 s on 2 cores with inductor's max-autotune,
the default, 17 s without) and kept on disk, keyed by the backbone, the controller, torch, the CPU's vector ISA
and the thread count (inductor builds them in), under ``~/.cache/adaperceiver-rl/aot/``
(``$ADAPERCEIVER_CACHE_DIR/aot`` if set). Predictions equal eager ``predict``'s
up to float rounding (logits within ~1e-5; the check is in ``tests/test_aot_batch1.py``), so an image whose probe
confidence sits within that rounding of a cascade's threshold (or whose actor logits tie) may be sent elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from backbone.fileio import user_cache_dir
from backbone.model import PatchMemory
from backbone.settings import Setting
from benchmarks.timing import cpu_description
from envs.outcome_table import CACHE_DIR_ENV, backbone_identity
from policy.adaptive import AdaptiveClassifier, Prediction
from policy.cascade import ProbeCascade
from policy.controller import action_logits


def _patchify_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution with kernel = stride and no padding (a patch embedding, a 1x1 projection) as a reshape and
    one matmul: the same sums, one fused copy and a GEMM call instead of a oneDNN convolution."""
    b, c, h, w = x.shape
    (kh, kw), out = conv.kernel_size, conv.out_channels
    ho, wo = h // kh, w // kw
    patches = x.reshape(b, c, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, ho * wo, c * kh * kw)
    y = F.linear(patches, conv.weight.reshape(out, -1), conv.bias)
    return y.transpose(1, 2).reshape(b, out, ho, wo)


def _taps(conv: nn.Conv2d, x: torch.Tensor) -> tuple[list[tuple[int, int, torch.Tensor]], tuple[int, int, int]]:
    """One NHWC tensor per kernel tap ``(i, j)``, aligned with the output grid: ``x`` rolled by the tap's offset,
    subsampled by the stride and multiplied by a constant 0/1 mask that zeroes what wrapped around (the padding).
    A rolled read is plain index arithmetic, where a padded one (``F.pad`` inlined into its consumer) cost a masked
    load per element and tap: the patch context as shifted slices of a padded grid took ~50 us at batch 1."""
    b, _, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    nhwc = x.permute(0, 2, 3, 1)  # a view of the channels-last layout the stem and the patch context use
    taps = []
    for i in range(kh):
        rows = torch.arange(ho) * sh + i - ph  # the input row each output row reads at this tap
        for j in range(kw):
            cols = torch.arange(wo) * sw + j - pw
            inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
            rolled = torch.roll(nhwc, shifts=(ph - i, pw - j), dims=(1, 2))
            rolled = rolled[:, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw]
            taps.append((i, j, rolled * inside[..., None].to(x.dtype)))
    return taps, (b, ho, wo)


TAP_WEIGHT = "batch1_tap_weight"  # the buffer name of the laid-out weights while exporting


def _tap_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weights as the rolled forms read them: ``(kh*kw, out)`` for one input channel or a depthwise convolution,
    ``(out, kh*kw*in)`` (tap-major, as the taps are laid side by side) for a dense one. While exporting, a contiguous
    copy that ``_export_forms`` registers on the convolution, so that the compiled loops load a tap's weights as
    one vector instead of gathering a strided view element by element."""
    laid_out = conv._buffers.get(TAP_WEIGHT)
    if laid_out is not None:
        return laid_out
    if conv.in_channels == 1 or conv.groups > 1:  # (out, 1, kh, kw)
        return conv.weight.reshape(conv.out_channels, -1).t()
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)


def _depthwise_by_rolls(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A depthwise convolution as k*k rolled multiply-adds, which inductor fuses into one loop over channels."""
    taps, _ = _taps(conv, x)
    weight = _tap_weight(conv)
    out = conv.bias
    for i, j, tap in taps:
        out = out + tap * weight[i * conv.kernel_size[1] + j]
    return out.permute(0, 3, 1, 2)


def _dense_by_rolls(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A dense k x k convolution from its taps: with one input channel as k*k multiply-adds (one loop), with more as
    the taps side by side and one matmul (inductor's GEMM). At batch 1 ATen runs these small convolutions on its
    slow im2col path (oneDNN only from ~20k input values), 35-50 us each inside a compiled setting."""
    taps, (b, ho, wo) = _taps(conv, x)
    weight = _tap_weight(conv)
    if conv.in_channels == 1:
        out = sum(tap * weight[i * conv.kernel_size[1] + j] for i, j, tap in taps)
        out = out if conv.bias is None else out + conv.bias
        return out.permute(0, 3, 1, 2)
    patches = torch.cat([tap for _, _, tap in taps], -1).reshape(b, ho * wo, -1)  # (B, Ho*Wo, kh*kw*C), tap-major
    return F.linear(patches, weight, conv.bias).reshape(b, ho, wo, -1).permute(0, 3, 1, 2)


def _batch1_form(conv: nn.Conv2d) -> Callable[[nn.Conv2d, torch.Tensor], torch.Tensor] | None:
    """The batch-1 form of ``conv``, or None to keep the convolution."""
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return None
    if conv.groups == 1 and conv.kernel_size == conv.stride and conv.padding == (0, 0):
        return _patchify_linear
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0 or conv.padding != (kh // 2, kw // 2):
        return None  # the taps need "same" padding: a rolled, subsampled tap then fits in the input
    if conv.groups == conv.in_channels == conv.out_channels > 1 and conv.bias is not None:
        return _depthwise_by_rolls
    return _dense_by_rolls if conv.groups == 1 else None


@contextlib.contextmanager
def _export_forms(model: nn.Module) -> Iterator[None]:
    """While exporting: leave out the model's input check (data-dependent: it raises on what it reads; the compiled
    paths return its verdict instead, ``_in_range``), run every convolution in a form that compiles into inductor's own
    loops and GEMMs (the patch embedding as a matmul, the 3x3 stem convolutions and the patch context from rolled
    taps: as ATen or oneDNN calls inside the compiled paths they took 35-60 us each at batch 1), and attention as
    its math. Eager code keeps the convolutions and the fused attention kernel, which are faster at large
    batches."""
    swapped = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        form = _batch1_form(conv)
        if form is not None:
            conv.forward = functools.partial(form, conv)  # an instance attribute shadows the method
            if form is not _patchify_linear:
                conv.register_buffer(TAP_WEIGHT, _tap_weight(conv).detach().contiguous(), persistent=False)
            swapped.append(conv)
    model.check_input = lambda x: None
    try:
        # attention over 1-8 latents traced as its math (two matmuls and a softmax), which inductor fuses, instead
        # of a call into the CPU flash-attention kernel: front and a 6-block setting 1.12x faster each, paired
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        del model.check_input
        for conv in swapped:
            del conv.forward
            conv._buffers.pop(TAP_WEIGHT, None)


def _in_range(x: torch.Tensor) -> torch.Tensor:
    """The input check's verdict on the pixels, computed inside a compiled path (NaN fails both comparisons): one
    fused loop instead of eager ``check_input``'s reduction and conversions (~11 us an image), which runs only to
    word the error when this says no."""
    return ((x >= 0) & (x <= 1)).all()


class _Front(nn.Module):
    """Image -> (patch tokens, stem feature map, probe latents, probe logits, probe labels, decision, pixels in
    range): what every image pays (an empty tensor stands for a part the model or the observation does not have).

    The decision is the controller's: the chosen action indices for a PPO policy (the mode of its distribution,
    computed with :func:`policy.controller.choose_actions`'s ops), the observation for a cascade (its comparison
    with tau is one numpy op)."""

    def __init__(self, clf: AdaptiveClassifier) -> None:
        super().__init__()
        self.clf = clf
        self.backbone, self.policy = clf.backbone, clf.policy  # registered, so export sees their weights

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        clf = self.clf
        memory, probe = clf.spec.embed_and_probe(clf.backbone, x)
        obs = clf.spec.compute(clf.backbone, memory, None if probe is None else probe[1])
        if isinstance(clf.policy, ProbeCascade):
            decision = obs
        else:
            logits = action_logits(clf.policy, obs).split(list(clf.policy.action_dist.action_dims), dim=1)
            picks = [F.softmax(part - part.logsumexp(-1, keepdim=True), -1).argmax(1) for part in logits]
            decision = torch.stack(picks, 1)
        none = memory.tokens.new_zeros(0)
        latents, logits = probe if probe is not None else (none, none)
        features = none if memory.features is None else memory.features
        return memory.tokens, features, latents, logits, logits.argmax(-1), decision, _in_range(x)


class _Setting(nn.Module):
    """(patch tokens, feature map, probe latents) -> (logits, labels) at one setting, going on from the front's work as
    ``AdaptiveClassifier.predict`` does: a deeper stage continues the stem, a setting at the probe's stage, tokens
    and width starts from the probe's latents after its first block."""

    def __init__(self, clf: AdaptiveClassifier, action: tuple[int, ...], stage: int | None) -> None:
        super().__init__()
        self.backbone = clf.backbone
        self.setting = clf.grid.setting(action)
        self.memory_stage = stage
        self.from_probe = bool(clf.continues_probe[action])

    def forward(
        self, tokens: torch.Tensor, features: torch.Tensor, probe_latents: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        model, s = self.backbone, self.setting
        memory = PatchMemory(tokens, features if features.numel() else None, self.memory_stage)
        if s.stage is not None and s.stage != self.memory_stage:
            memory = model.continue_embed(memory, s.stage)
        start = probe_latents if self.from_probe else model.read_latents(memory, s.tokens)
        logits = model.forward_head(model.forward_blocks(start, int(self.from_probe), s.depth, s.width))
        return logits, logits.argmax(-1)


class _Full(nn.Module):
    """Image -> (logits, pixels in range) at the full setting: the backbone, checked as the front is."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x), _in_range(x)


FORMS_VERSION = 5  # bump when what is exported changes (_export_forms, _Front, _Setting): old packages are not reused


def default_aot_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() / "aot" if env else user_cache_dir("aot")


def _fingerprint(clf: AdaptiveClassifier, max_autotune: bool) -> str:
    """What a compiled package depends on: backbone, controller, observation, torch, CPU ISA, threads, tuning."""
    h = hashlib.sha256(backbone_identity(clf.backbone).encode())
    if isinstance(clf.policy, ProbeCascade):
        h.update(json.dumps(clf.policy.to_json(), sort_keys=True).encode())
    else:
        for name, t in sorted(clf.policy.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    isa = cpu_description()["isa"]
    threads = torch.get_num_threads()
    h.update(f"{FORMS_VERSION}|{clf.observation}|{torch.__version__}|{isa}|{threads}|{max_autotune}".encode())
    return h.hexdigest()[:20]


def _compile(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, max_autotune: bool) -> None:
    """Export ``module`` at ``example``'s shapes and compile it into the package ``path``, atomically (a package
    half-written by an interrupted compile is never loaded). ``max_autotune`` lets inductor time its own C++ GEMM
    templates against the library's for every matmul: at 2 latents its kernels won (the front 1.6x, a stage-3
    setting of 6 blocks 2x faster, timed alternately in one process), for about twice the compile time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    quiet = {"autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # no tables on stderr
    tuning = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", **quiet} if max_autotune else {}
    try:
        with torch.no_grad(), inductor_config.patch(tuning):
            program = torch.export.export(module, example)
            built = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / path.name))
        os.replace(built, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class _Plan:
    runner: Callable | None
    settings: list[Setting]
    flops: np.ndarray


class AotBatch1:
    """One image at a time through AOT-compiled paths: :meth:`predict` (the adaptive path, eager ``predict``'s
    results and FLOPs) and :meth:`full` (the full setting's logits). ``on_compile(name)`` is called before each
    compile (a progress line: the first call of a new setting takes 35-38 s with ``max_autotune`` on 2 cores,
    17 s without, later ones microseconds)."""

    def __init__(
        self,
        clf: AdaptiveClassifier,
        cache_dir: str | os.PathLike | None = None,
        on_compile: Callable[[str], None] | None = None,
        max_autotune: bool = True,
    ) -> None:
        if next(clf.backbone.parameters()).device.type != "cpu":
            raise ValueError("AotBatch1 compiles for the CPU; this classifier is on another device")
        self.clf = clf
        self.dir = Path(cache_dir) if cache_dir is not None else default_aot_dir()
        self.dir /= _fingerprint(clf, max_autotune)
        self.max_autotune = max_autotune
        self.on_compile = on_compile
        cfg = clf.backbone.cfg
        self.image_shape = (1, cfg.in_chans, cfg.img_size, cfg.img_size)
        self._cascade = isinstance(clf.policy, ProbeCascade)
        # the stage of the front's memory (observe_embed's): the probe's, the deepest one without stem exits
        self._memory_stage = clf.backbone.resolve_stage(clf.grid.smallest.stage)
        self._runners: dict[str, Callable] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}

    def _runner(self, name: str, build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]) -> Callable:
        runner = self._runners.get(name)
        if runner is None:
            path = self.dir / f"{name}.pt2"
            if not path.is_file():
                if self.on_compile is not None:
                    self.on_compile(name)
                module, example = build()
                with _export_forms(self.clf.backbone):
                    _compile(module.eval(), example, path, self.max_autotune)
            # the package's loader runs flat tensor lists: its __call__ would parse the call spec's JSON and
            # rebuild pytrees on every call (~50 us, a sixth of the compiled front)
            runner = self._runners[name] = torch._inductor.aoti_load_package(str(path)).loader.run
        return runner

    def _image(self, image: torch.Tensor, path: str) -> torch.Tensor:
        """``image`` as the batch of one the packages take. The pixel range is checked inside them (``_in_range``,
        then :meth:`_checked`); eagerly only before ``path`` is first loaded, so that bad input compiles nothing."""
        x = image.unsqueeze(0) if image.ndim == len(self.image_shape) - 1 else image
        if tuple(x.shape) != self.image_shape:
            raise ValueError(f"AotBatch1 takes one image {self.image_shape[1:]}, got shape {tuple(image.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"AotBatch1 runs float32 images scaled to [0, 1], got dtype {x.dtype}")
        if path not in self._runners:
            self.clf.backbone.check_input(x)
        return x.contiguous()

    def _checked(self, x: torch.Tensor, in_range: torch.Tensor) -> None:
        if not in_range.item():
            self.clf.backbone.check_input(x)  # words the error (NaN, or the range found)
            raise ValueError("expected images scaled to [0, 1]")  # only if the two checks ever disagree

    def front(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The compiled front's outputs for one image (checked like the eager path checks it)."""
        x = self._image(image, "front")
        out = self._run_front(x)
        self._checked(x, out[-1])
        return out

    def _run_front(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._runner("front", lambda: (_Front(self.clf), (torch.zeros(self.image_shape),)))([x]))

    def full(self, image: torch.Tensor) -> torch.Tensor:
        """Logits ``(1, classes)`` of the full setting, compiled the same way (what the speed-up is read against)."""
        x = self._image(image, "full")
        run = self._runner("full", lambda: (_Full(self.clf.backbone), (torch.zeros(self.image_shape),)))
        logits, in_range = run([x])
        self._checked(x, in_range)
        return logits

    def predict(self, image: torch.Tensor) -> Prediction:
        """Classify one image ``(C, H, W)`` or ``(1, C, H, W)`` in [0, 1] at the setting its controller picks."""
        tokens, features, latents, logits, labels, decision, _ = self.front(image)
        actions = self.clf.policy.choose(decision[:, 0].numpy()) if self._cascade else decision.numpy()
        action = tuple(actions[0].tolist())
        plan = self._plans.get(action) or self._plan(action)
        if plan.runner is not None:  # None: the probe's answer stands
            logits, labels = plan.runner([tokens, features, latents])
        return Prediction(labels, logits, list(plan.settings), actions, plan.flops.copy())

    def _plan(self, action: tuple[int, ...]) -> _Plan:
        """What one chosen setting needs, worked out once: its compiled runner (None: the probe's answer stands),
        its Setting and FLOPs, counted as ``AdaptiveClassifier.predict`` counts them."""
        clf, actions = self.clf, np.array([action])
        at_probe = bool(clf.continues_probe[action]) and clf.grid.setting(action).depth == 1
        flops = clf.grid.flops_of(actions) - clf.reused_flops[action] + clf.controller_flops
        plan = _Plan(None if at_probe else self._setting(action), clf.grid.settings(actions), flops)
        self._plans[action] = plan
        return plan

    def _setting(self, action: tuple[int, ...]) -> Callable:
        def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
            tokens, features, latents = self._run_front(torch.zeros(self.image_shape))[:3]  # example shapes
            return _Setting(self.clf, action, self._memory_stage), (tokens, features, latents)

        return self._runner("setting_" + "_".join(map(str, action)), build)

    def compile_for(self, images: Sequence[torch.Tensor] | torch.Tensor) -> int:
        """Compile (or load) every path ``images`` need, so that timing them afterwards measures no compile;
        returns how many distinct settings they use."""
        used = set()
        for image in images:
            used.add(tuple(int(i) for i in self.predict(image).actions[0]))
        self.full(images[0])
        return len(used)
