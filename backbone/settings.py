"""The settings grid: every setting a backbone can run at, and what each one costs.

One type owns the conversions every layer needs (STYLE §12): action index <-> setting, the FLOPs of every setting
as an array, the smallest and the full setting, and the JSON form that controller sidecars and outcome tables
record. A setting is ``(tokens, depth, width)``, plus the input ``stage`` (stem convolutions run) when the model
has stem exits. The grid's axes are ``(tokens, depth, width)`` -- shape ``(K, L, M)`` -- or, with stem exits,
``(stage, tokens, depth, width)`` -- shape ``(S, K, L, M)``: a model without the input-side axis keeps the
three-number actions its controllers were trained with. Token index ``k`` selects ``tokens[k]`` latents, depth
index ``d`` runs ``d + 1`` blocks, width index ``m`` selects FFN width ``widths[m]``, stage index ``s`` runs
``stages[s]`` stem convolutions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from backbone.config import AdaPerceiverConfig
from backbone.flops import flops_breakdown
from backbone.pareto import pareto_front

Index = tuple[int, ...]


class Setting(NamedTuple):
    """One compute setting: latent tokens, blocks run, FFN width, and the input stage (None: no such axis).

    The field order matches ``AdaPerceiver.forward(x, num_tokens, depth, width, stage)``, so ``model(x, *s)`` runs it.
    """

    tokens: int
    depth: int
    width: int
    stage: int | None = None

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> Setting:
        """The setting of a report row (``SettingsGrid.table``: keys tokens, depth, width[, stage])."""
        return cls(row["tokens"], row["depth"], row["width"], row.get("stage"))

    def __str__(self) -> str:
        core = f"{self.tokens}/{self.depth}/{self.width}"
        return core if self.stage is None else f"s{self.stage}/{core}"


@dataclass(frozen=True, eq=False)
class SettingsGrid:
    """The grid of a backbone's settings and their analytic FLOPs per image."""

    tokens: tuple[int, ...]  # token granularities g_1 < ... < g_K
    depths: tuple[int, ...]  # 1..L
    widths: tuple[int, ...]  # FFN widths w_1 < ... < w_M
    flops: np.ndarray  # FLOPs per image of each setting, shape ``self.shape``
    stages: tuple[int, ...] = ()  # stem convs run at each input stage; () = no input-side axis

    @classmethod
    def from_config(cls, cfg: AdaPerceiverConfig) -> SettingsGrid:
        stages = cfg.stages if len(cfg.stages) > 1 else ()
        depths = tuple(range(1, cfg.depth + 1))
        flops = np.array(
            [[[[sum(flops_breakdown(cfg, g, d, w, s).values()) for w in cfg.widths] for d in depths]
              for g in cfg.token_granularities] for s in (stages or (None,))],
            dtype=np.int64,
        )  # fmt: skip
        flops = flops if stages else flops[0]
        flops.setflags(write=False)
        return cls(tuple(cfg.token_granularities), depths, tuple(cfg.widths), flops, stages)

    # --- shape -------------------------------------------------------------------------------------------------
    @property
    def axes(self) -> tuple[str, ...]:
        """Names of the index positions: ``("stage",)`` (with stem exits) ``+ ("tokens", "depth", "width")``."""
        return (("stage",) if self.stages else ()) + ("tokens", "depth", "width")

    @property
    def shape(self) -> Index:
        """``(S,) K, L, M``: the ``nvec`` of the environment's ``MultiDiscrete`` action space."""
        return ((len(self.stages),) if self.stages else ()) + (len(self.tokens), len(self.depths), len(self.widths))

    @property
    def ndim(self) -> int:
        return len(self.axes)

    def axis(self, name: str) -> int:
        """Position of an axis in an index (e.g. ``axis("depth")``)."""
        return self.axes.index(name)

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def indices(self) -> Iterator[Index]:
        """Every index in C order."""
        return iter(np.ndindex(*self.shape))

    def __iter__(self) -> Iterator[Setting]:
        """Every setting in index order."""
        return (self.setting(i) for i in self.indices())

    # --- index <-> setting -------------------------------------------------------------------------------------
    def setting(self, index: Sequence[int] | np.ndarray) -> Setting:
        """The setting of an index; ValueError when the index is outside the grid."""
        index = self.check_index(index)
        stage = self.stages[index[0]] if self.stages else None
        k, d, m = index[-3:]
        return Setting(self.tokens[k], self.depths[d], self.widths[m], stage)

    def settings(self, indices: np.ndarray) -> list[Setting]:
        """Settings of a batch of indices ``(B, ndim)``, checked like :meth:`setting` but in one numpy pass (a
        per-row :meth:`setting` cost 2 us an image, 3-4% of adaptive inference at batch 256)."""
        rows = np.asarray(indices).reshape(-1, self.ndim)
        if rows.dtype.kind not in "iu":
            rows = np.array([self.check_index(r) for r in rows.tolist()], dtype=np.int64).reshape(-1, self.ndim)
        bad = ((rows < 0) | (rows >= np.asarray(self.shape))).any(axis=1)
        if bad.any():
            self.check_index(rows[int(bad.argmax())])  # raises the one-row error for the first bad row
        v = self.values(rows)
        stages = v.stage.tolist() if v.stage is not None else [None] * len(rows)
        return list(map(Setting, v.tokens.tolist(), v.depth.tolist(), v.width.tolist(), stages))

    def values(self, indices: np.ndarray) -> Setting:
        """Vectorised :meth:`setting`: a Setting of ``(B,)`` arrays (``stage`` None without stem exits)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, self.ndim).T
        stage = np.asarray(self.stages)[idx[0]] if self.stages else None
        k, d, m = idx[-3:]
        return Setting(np.asarray(self.tokens)[k], np.asarray(self.depths)[d], np.asarray(self.widths)[m], stage)

    def index(self, setting: Sequence[int | None]) -> Index:
        """Index of ``(tokens, depth, width[, stage])``; ValueError naming the valid values otherwise."""
        s = Setting(*setting)
        if (s.stage is None) != (not self.stages):
            raise ValueError(f"setting {tuple(setting)} needs {'a' if self.stages else 'no'} stage for this grid")
        named = [(s.tokens, self.tokens, "tokens"), (s.depth, self.depths, "depth"), (s.width, self.widths, "width")]
        if self.stages:
            named.insert(0, (s.stage, self.stages, "stage"))
        for value, axis, name in named:
            if value not in axis:
                raise ValueError(f"{name}={value} is not in the settings grid; choose one of {list(axis)}")
        return tuple(axis.index(value) for value, axis, _ in named)

    def check_index(self, index: Sequence[int] | np.ndarray) -> Index:
        """``index`` as ints inside the grid, or ValueError saying which bounds it breaks."""
        names = ", ".join(self.axes)
        try:
            index = tuple(int(i) for i in index)
        except (TypeError, ValueError):
            raise ValueError(f"a setting index is {self.ndim} integers ({names} index), got {index!r}") from None
        if len(index) != self.ndim:
            raise ValueError(f"a setting index is {self.ndim} integers ({names} index), got {list(index)}")
        if not all(0 <= i < n for i, n in zip(index, self.shape, strict=True)):
            bounds = ", ".join(f"{a} index 0..{n - 1}" for a, n in zip(self.axes, self.shape, strict=True))
            dims = " x ".join(map(str, self.shape))
            raise ValueError(f"index {list(index)} is outside the {dims} settings grid: {bounds}")
        return index

    # --- named settings and cost -------------------------------------------------------------------------------
    @property
    def smallest_index(self) -> Index:
        return (0,) * self.ndim

    @property
    def full_index(self) -> Index:
        return tuple(n - 1 for n in self.shape)

    @property
    def smallest(self) -> Setting:
        return self.setting(self.smallest_index)

    @property
    def full(self) -> Setting:
        return self.setting(self.full_index)

    @property
    def full_flops(self) -> int:
        return int(self.flops[self.full_index])

    def flops_of(self, indices: np.ndarray) -> np.ndarray:
        """FLOPs per image ``(B,)`` of a batch of indices ``(B, ndim)``."""
        return self.flops[tuple(np.asarray(indices).reshape(-1, self.ndim).T)]

    def relative_cost(self) -> np.ndarray:
        """``FLOPs / FLOPs(full)`` of every setting, float64 (the reward's compute term per unit penalty)."""
        return self.flops.astype(np.float64) / float(self.full_flops)

    def table(self, accuracy: np.ndarray) -> list[dict[str, Any]]:
        """One row per setting (index order): its values, FLOPs, ``accuracy[index]``, Pareto or not."""
        accuracy = np.asarray(accuracy)
        if accuracy.shape != self.shape:
            raise ValueError(f"accuracy has shape {accuracy.shape}, the settings grid {self.shape}")
        rows = []
        for i in self.indices():
            values = {k: v for k, v in self.setting(i)._asdict().items() if v is not None}
            rows.append({**values, "flops": int(self.flops[i]), "accuracy": float(accuracy[i])})
        front = set(pareto_front([r["flops"] for r in rows], [r["accuracy"] for r in rows]).tolist())
        for i, r in enumerate(rows):
            r["pareto"] = i in front
        return rows

    # --- JSON (controller sidecars, outcome tables) ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The axes as recorded: ``{"token_granularities", "depth": L, "widths"}`` (+ ``"stages"`` with exits)."""
        data: dict[str, Any] = {"token_granularities": list(self.tokens), "depth": len(self.depths),
                                "widths": list(self.widths)}  # fmt: skip
        if self.stages:
            data["stages"] = list(self.stages)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], flops: np.ndarray) -> SettingsGrid:
        """A recorded grid (:meth:`to_json`) with its recorded FLOPs array (outcome tables store both)."""
        axes = cls.axes_of(data)
        if not isinstance(axes["depth"], int):
            raise ValueError(f"recorded grid has an unreadable depth axis: {data.get('depth')!r}")
        grid = cls(tuple(axes["token_granularities"]), tuple(range(1, axes["depth"] + 1)), tuple(axes["widths"]),
                   np.asarray(flops, dtype=np.int64), tuple(axes.get("stages", ())))  # fmt: skip
        if grid.flops.shape != grid.shape:
            raise ValueError(f"recorded FLOPs have shape {grid.flops.shape}, the recorded grid {grid.shape}")
        return grid

    @staticmethod
    def axes_of(data: dict[str, Any]) -> dict[str, Any]:
        """Normalise a recorded grid (depth as ``L`` or as the list ``1..L``, as older tables wrote it)."""
        depth = data.get("depth")
        if isinstance(depth, list):
            depth = len(depth) if depth == list(range(1, len(depth) + 1)) else depth
        axes = {"token_granularities": list(data.get("token_granularities", [])), "depth": depth,
                "widths": list(data.get("widths", []))}  # fmt: skip
        if data.get("stages"):
            axes["stages"] = list(data["stages"])
        return axes

    def matches(self, data: dict[str, Any]) -> bool:
        """Whether a recorded grid (:meth:`to_json`, or an older table's form) has these axes."""
        return self.axes_of(data) == self.to_json()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SettingsGrid):
            return NotImplemented
        return self.to_json() == other.to_json() and np.array_equal(self.flops, other.flops)

    def __hash__(self) -> int:
        return hash((self.tokens, self.depths, self.widths, self.stages))
