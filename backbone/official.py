"""Load the released AdaPerceiver checkpoints (arXiv 2511.18105) into this package's model, with numerical parity.

The release (GitHub ``pjjajal/adaperceiver-public``, MIT) ships ``ClassificationAdaPerceiver`` and the distilled
``DistillAdaPerceiver`` in the Hugging Face ``PyTorchModelHubMixin`` layout: a folder with ``config.json`` (the
constructor arguments) and ``model.safetensors``. What differs from this package's defaults, and how it is mapped:

* input adapter: LayerNorm + GELU MLP after the position embedding (``use_embed_ffn`` -> ``embed_mlp``);
* timm's ``layernorm`` (eps 1e-6) everywhere and no norm before the classifier (``norm_eps``, ``head_norm``);
* RoPE on interleaved pairs (LLaMA layout) with float32 tables: each head's q/k rows are permuted to
  ``[0, 2, 4, .., 1, 3, 5, ..]`` here, which turns it into this package's rotate-half layout (q.k is unchanged
  because q and k get the same permutation), and ``rope_fp32`` reproduces the tables;
* separate q / k / v linears, concatenated into ``qkv`` / ``kv``;
* images normalised with the OpenAI CLIP mean/std after Resize(256) + CenterCrop(224): the model takes [0, 1]
  images and normalises inside, like every model of this package (``resize_size`` records the resize);
* its ``attn_layer: full`` ignores the block mask, so such a checkpoint runs with ``latent_mask: none``.

Anything else that cannot be represented is refused with a one-line error naming the ``config.json`` field.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from backbone.checkpoint import CheckpointError
from backbone.config import AdaPerceiverConfig
from backbone.fileio import file_sha256
from backbone.model import AdaPerceiver

HUB_IDS = {
    "in1k": "pjajal/adaperceiver-v1-in1k-ft",  # ImageNet-1K classifier (85.4% top-1)
    "in12k": "pjajal/adaperceiver-v1",  # ImageNet-12K logit + feature distilled
}
FILES = ("config.json", "model.safetensors")
# constructor arguments that do not change what an eval-mode forward computes
_INERT = {"proj_drop", "attn_drop", "drop_path", "head_drop", "process_token_init", "output_feat_dim"}
_USED = {
    "embed_dim", "num_heads", "depth", "max_latent_tokens", "rope_theta", "ffn_ratio", "qkv_bias", "proj_bias",
    "ls_init_values", "act_layer", "norm_layer", "ffn_layer", "attn_layer", "block_mask", "mask_token_grans",
    "mat_dims", "img_size", "in_channels", "patch_size", "num_classes", "use_embed_ffn", "use_output_ffn",
}  # fmt: skip
_IGNORED_KEYS = ("output_latents_feat.", "output_adapter_feat.", "write_head_feat.")  # the distilled feature branch
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_official(
    path_or_hub_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None
) -> Path:
    """The local folder holding ``config.json`` + ``model.safetensors``: ``path_or_hub_id`` itself, or a hub id
    (or a short name of :data:`HUB_IDS`) resolved through ``huggingface_hub``'s cache.

    ``local_files_only=None`` downloads only when ``HF_HUB_OFFLINE`` is unset; nothing is fetched if it is cached.
    """
    source = HUB_IDS.get(str(path_or_hub_id), path_or_hub_id)
    path = Path(source)
    if path.is_dir():
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path} is not a released AdaPerceiver folder: missing {', '.join(missing)}")
        return path
    if path.exists() or not _HUB_ID.match(str(source)):
        raise CheckpointError(f"{source} is neither a folder with {' + '.join(FILES)} nor a Hugging Face hub id")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"loading {source} from the hub needs huggingface_hub (pip install huggingface_hub), or pass a local "
            f"folder with {' + '.join(FILES)}"
        ) from None
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = huggingface_hub.snapshot_download(
            str(source), allow_patterns=list(FILES), cache_dir=cache_dir, local_files_only=local_files_only
        )
    except Exception as e:  # offline, not cached, no such repo, network error: one line either way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "is not in the Hugging Face cache" if local_files_only else "could not be downloaded"
        raise CheckpointError(
            f"{source} {where} ({type(e).__name__}: {reason}); download {' and '.join(FILES)} on a machine with "
            f"access and pass that folder"
        ) from None
    return resolve_official(folder)


def read_official_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object of constructor arguments")
    return raw


def _refuse(field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"config.json field {field}={value!r} cannot be represented: {why}")


def official_config(raw: dict[str, Any], name: str = "adaperceiver_official") -> AdaPerceiverConfig:
    """This package's config for a release ``config.json``; CheckpointError names a field it cannot represent."""
    for field, want, why in (
        ("ffn_layer", "mlp", "only the GELU MLP is implemented"),
        ("act_layer", "gelu", "only GELU is implemented"),
        ("norm_layer", "layernorm", "only timm's layernorm (eps 1e-6) is implemented"),
    ):
        if raw.get(field, want) != want:
            raise _refuse(field, raw[field], why)
    if raw.get("use_output_ffn", False):
        raise _refuse("use_output_ffn", raw["use_output_ffn"], "the classifier is a single linear layer here")
    mask = raw.get("block_mask", "block")
    if mask not in ("block", "none"):
        raise _refuse("block_mask", mask, "only the block-causal mask or none is implemented")
    attn = raw.get("attn_layer", "flex")
    if attn not in ("flex", "full"):
        raise _refuse("attn_layer", attn, "expected flex or full")
    unknown = sorted(k for k, v in raw.items() if k not in _USED | _INERT and v not in (None, False, 0, "", []))
    if unknown:
        raise _refuse(unknown[0], raw[unknown[0]], "this loader does not know the field")
    dim = int(raw.get("embed_dim", 768))
    max_tokens = int(raw.get("max_latent_tokens", 256))
    grans = sorted({int(g) for g in raw.get("mask_token_grans") or []})
    if mask == "block" and not grans:
        raise _refuse("mask_token_grans", raw.get("mask_token_grans"), "block_mask: block needs granularities")
    if grans and (grans[0] < 1 or grans[-1] > max_tokens):
        raise _refuse("mask_token_grans", raw["mask_token_grans"], f"need values in 1..{max_tokens}")
    widths = sorted({int(w) for w in raw.get("mat_dims") or []} | {dim})
    if widths[0] < 1 or widths[-1] != dim:
        raise _refuse("mat_dims", raw["mat_dims"], f"need widths in 1..embed_dim={dim}")
    img_size = int(raw.get("img_size", 224))
    # its attn_layer "full" drops the block mask silently: parity means running without one
    latent_mask = "none" if mask == "none" or attn == "full" else "block"
    try:
        return AdaPerceiverConfig(
            img_size=img_size,
            in_chans=int(raw.get("in_channels", 3)),
            num_classes=int(raw.get("num_classes", 1000)),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            resize_size=round(img_size * 256 / 224),  # Resize(256) + CenterCrop(224), scaled for other sizes
            patch_size=int(raw.get("patch_size", 16)),
            stem="patch",
            embed_mlp=bool(raw.get("use_embed_ffn", False)),
            embed_dim=dim,
            num_heads=int(raw.get("num_heads", 12)),
            depth=int(raw.get("depth", 12)),
            ffn_ratio=float(raw.get("ffn_ratio", 4.0)),
            qkv_bias=bool(raw.get("qkv_bias", True)),
            ls_init_values=float(raw.get("ls_init_values") or 1.0),
            rope_theta=float(raw.get("rope_theta", 10000)),
            rope_fp32=True,
            norm_eps=1e-6,
            head_norm=False,
            latent_mask=latent_mask,
            token_granularities=(*(g for g in grans if g < max_tokens), max_tokens),
            widths=tuple(widths),
            name=name,
        )
    except ValueError as e:
        raise CheckpointError(f"config.json describes a model this package cannot build: {e}") from None


def _strip(key: str) -> str:
    """Drop the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) parts of a parameter name."""
    parts = key.split(".")
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(p for p in parts if p != "_orig_mod")


def _rope_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (weight or bias) per head from interleaved pairs to halves: [0, 2, .., 1, 3, ..]."""
    head_dim = t.shape[0] // num_heads
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return t.reshape(num_heads, head_dim, *t.shape[1:])[:, perm].reshape(t.shape)


def official_state_dict(state: dict[str, torch.Tensor], model: AdaPerceiver) -> dict[str, torch.Tensor]:
    """The release's tensors renamed, reshaped and permuted into ``model``'s state_dict; CheckpointError lists what
    is missing or left over."""
    src = {_strip(k): v for k, v in state.items() if not _strip(k).startswith(_IGNORED_KEYS)}
    want = model.state_dict()
    heads, dim = model.cfg.num_heads, model.cfg.embed_dim
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        if key in src:
            used.add(key)
            return src[key]
        return default

    def put(name: str, key: str, default: torch.Tensor | None = None) -> None:
        t = take(key, default)
        if t is not None:
            out[name] = t

    def attention(ours: str, theirs: str, kv_names: tuple[str, ...]) -> None:
        """q, k (RoPE rows permuted) and v linears -> our fused ones; a missing proj bias (proj_bias false) = 0."""
        for part in ("weight", "bias"):
            q, k, v = (take(f"{theirs}.{n}.{part}") for n in ("q", "k", "v"))
            if q is None or k is None or v is None:
                continue
            q, k = _rope_rows(q, heads), _rope_rows(k, heads)
            if len(kv_names) == 1:
                out[f"{ours}.{kv_names[0]}.{part}"] = torch.cat((q, k, v))
            else:
                out[f"{ours}.{kv_names[0]}.{part}"], out[f"{ours}.{kv_names[1]}.{part}"] = q, torch.cat((k, v))
        put(f"{ours}.proj.weight", f"{theirs}.proj.weight")
        put(f"{ours}.proj.bias", f"{theirs}.proj.bias", torch.zeros(dim))

    def norm(ours: str, theirs: str) -> None:
        put(f"{ours}.weight", f"{theirs}.weight")
        put(f"{ours}.bias", f"{theirs}.bias")

    put("stem.proj.weight", "patch_embed.embed.proj.weight")
    put("stem.proj.bias", "patch_embed.embed.proj.bias")
    put("pos_embed", "patch_embed.pos_embed")
    norm("embed_mlp.norm", "patch_embed.norm")
    for fc in ("fc1", "fc2"):
        norm(f"embed_mlp.mlp.{fc}", f"patch_embed.ffn.{fc}")
    for ours, theirs in (("read", "read_head"), ("write", "write_head")):
        norm(f"{ours}.norm_q", f"{theirs}.snk_norm")
        norm(f"{ours}.norm_kv", f"{theirs}.src_norm")
        attention(ours, f"{theirs}.cattn", ("q", "kv"))
    for i in range(model.cfg.depth):
        b = f"blocks.{i}"
        norm(f"{b}.norm1", f"{b}.norm1")
        norm(f"{b}.norm2", f"{b}.norm2")
        attention(f"{b}.attn", f"{b}.attn", ("qkv",))
        for ls in ("ls1", "ls2"):  # ls_init_values 0 means no LayerScale: a gamma of ones
            put(f"{b}.{ls}.gamma", f"{b}.{ls}.gamma", torch.ones(dim))
        for fc in ("fc1", "fc2"):
            norm(f"{b}.mlp.{fc}", f"{b}.ffn.{fc}")
    for ours, theirs in (("latent", "process_latents.token"), ("out_query", "output_latents.token")):
        t = take(theirs)
        if t is not None:
            out[ours] = t.reshape(1, 1, -1)
    norm("head", "output_adapter.ffn")

    leftover = sorted(set(src) - used)
    missing = sorted(set(want) - set(out))
    shape = sorted(k for k in set(want) & set(out) if tuple(want[k].shape) != tuple(out[k].shape))
    if leftover or missing or shape:
        raise CheckpointError(
            f"the weights do not match config.json: missing {missing[:5]}, unexpected {leftover[:5]}, "
            f"wrong shape {shape[:5]}"
        )
    return {k: out[k].to(want[k].dtype) for k in want}


def load_official(
    path_or_hub_id: str | os.PathLike,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> AdaPerceiver:
    """A released checkpoint (a local folder, a hub id, or ``in1k`` / ``in12k``) as a frozen eval-mode
    :class:`AdaPerceiver` that takes [0, 1] images of ``cfg.img_size`` (resize and crop first: ``cfg.resize_size``).

    The model carries ``official_source`` (what was asked for), ``official_sha256`` (of ``model.safetensors``) and
    ``official_config`` (the raw ``config.json``).
    """
    folder = resolve_official(path_or_hub_id, cache_dir, local_files_only)
    raw = read_official_config(folder)
    cfg = official_config(raw)
    weights = folder / "model.safetensors"
    try:
        state = safetensors.torch.load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read the weights of {weights} (truncated or corrupt?): {e}") from None
    model = AdaPerceiver(cfg)
    model.load_state_dict(official_state_dict(state, model))
    model.requires_grad_(False).eval().to(device)
    model.official_source = str(path_or_hub_id)
    model.official_sha256 = file_sha256(weights)
    model.official_config = raw
    return model
