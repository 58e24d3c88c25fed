"""The settings grid: every ``(tokens, depth, width)`` a backbone can run at, and what each one costs.

One type owns the conversions every layer needs (STYLE §12): action index ``(k, d, m)`` <-> setting, the FLOPs of
every setting as a ``(K, L, M)`` array, the smallest and the full setting, and the JSON form that controller
sidecars and outcome tables record. Index ``k`` selects ``tokens[k]`` latents, ``d`` runs ``d + 1`` blocks and
``m`` selects FFN width ``widths[m]``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from backbone.config import AdaPerceiverConfig
from backbone.flops import flops_breakdown
from backbone.pareto import pareto_front

Index = tuple[int, int, int]


class Setting(NamedTuple):
    """One compute setting: latent tokens, number of blocks run, FFN width."""

    tokens: int
    depth: int
    width: int

    def __str__(self) -> str:
        return f"{self.tokens}/{self.depth}/{self.width}"


@dataclass(frozen=True, eq=False)
class SettingsGrid:
    """The ``K x L x M`` grid of a backbone's settings and their analytic FLOPs per image."""

    tokens: tuple[int, ...]  # token granularities g_1 < ... < g_K
    depths: tuple[int, ...]  # 1..L
    widths: tuple[int, ...]  # FFN widths w_1 < ... < w_M
    flops: np.ndarray  # (K, L, M) int64 FLOPs per image of each setting

    @classmethod
    def from_config(cls, cfg: AdaPerceiverConfig) -> SettingsGrid:
        depths = tuple(range(1, cfg.depth + 1))
        flops = np.array(
            [[[sum(flops_breakdown(cfg, g, d, w).values()) for w in cfg.widths] for d in depths] for g in
             cfg.token_granularities],
            dtype=np.int64,
        )  # fmt: skip
        flops.setflags(write=False)
        return cls(tuple(cfg.token_granularities), depths, tuple(cfg.widths), flops)

    # --- shape -------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> Index:
        """(K, L, M): the ``nvec`` of the environment's ``MultiDiscrete`` action space."""
        return len(self.tokens), len(self.depths), len(self.widths)

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def indices(self) -> Iterator[Index]:
        """Every index ``(k, d, m)`` in C order."""
        return iter(np.ndindex(*self.shape))

    def __iter__(self) -> Iterator[Setting]:
        """Every setting in index order."""
        return (self.setting(i) for i in self.indices())

    # --- index <-> setting -------------------------------------------------------------------------------------
    def setting(self, index: Sequence[int] | np.ndarray) -> Setting:
        """The setting of index ``(k, d, m)``; ValueError when the index is outside the grid."""
        k, d, m = self.check_index(index)
        return Setting(self.tokens[k], self.depths[d], self.widths[m])

    def settings(self, indices: np.ndarray) -> list[Setting]:
        """Settings of a batch of indices ``(B, 3)``."""
        return [self.setting(i) for i in np.asarray(indices).reshape(-1, 3).tolist()]

    def values(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, depth and width ``(B,)`` each of a batch of indices ``(B, 3)`` (vectorised :meth:`setting`)."""
        k, d, m = np.asarray(indices, dtype=np.int64).reshape(-1, 3).T
        return np.asarray(self.tokens)[k], np.asarray(self.depths)[d], np.asarray(self.widths)[m]

    def index(self, setting: Sequence[int]) -> Index:
        """Index ``(k, d, m)`` of ``(tokens, depth, width)``; ValueError naming the valid values otherwise."""
        g, d, w = (int(v) for v in setting)
        for value, axis, name in ((g, self.tokens, "tokens"), (d, self.depths, "depth"), (w, self.widths, "width")):
            if value not in axis:
                raise ValueError(f"{name}={value} is not in the settings grid; choose one of {list(axis)}")
        return self.tokens.index(g), self.depths.index(d), self.widths.index(w)

    def check_index(self, index: Sequence[int] | np.ndarray) -> Index:
        """``index`` as three ints inside the grid, or ValueError saying which bounds it breaks."""
        try:
            k, d, m = (int(i) for i in index)
        except (TypeError, ValueError):
            raise ValueError(f"a setting index is 3 integers (token, depth, width index), got {index!r}") from None
        nk, nd, nm = self.shape
        if not (0 <= k < nk and 0 <= d < nd and 0 <= m < nm):
            raise ValueError(
                f"index {[k, d, m]} is outside the {nk} x {nd} x {nm} settings grid: token index 0..{nk - 1}, "
                f"depth index 0..{nd - 1}, width index 0..{nm - 1}"
            )
        return k, d, m

    # --- named settings and cost -------------------------------------------------------------------------------
    @property
    def smallest_index(self) -> Index:
        return 0, 0, 0

    @property
    def full_index(self) -> Index:
        nk, nd, nm = self.shape
        return nk - 1, nd - 1, nm - 1

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
        """FLOPs per image ``(B,)`` of a batch of indices ``(B, 3)``."""
        return self.flops[tuple(np.asarray(indices).reshape(-1, 3).T)]

    def relative_cost(self) -> np.ndarray:
        """``FLOPs / FLOPs(full)`` of every setting, ``(K, L, M)`` float64 (the reward's compute term per unit)."""
        return self.flops.astype(np.float64) / float(self.full_flops)

    def table(self, accuracy: np.ndarray) -> list[dict[str, Any]]:
        """One row per setting (index order): tokens, depth, width, FLOPs, ``accuracy[k, d, m]``, Pareto or not."""
        accuracy = np.asarray(accuracy)
        if accuracy.shape != self.shape:
            raise ValueError(f"accuracy has shape {accuracy.shape}, the settings grid {self.shape}")
        rows = [
            {**self.setting(i)._asdict(), "flops": int(self.flops[i]), "accuracy": float(accuracy[i])}
            for i in self.indices()
        ]
        front = set(pareto_front([r["flops"] for r in rows], [r["accuracy"] for r in rows]).tolist())
        for i, r in enumerate(rows):
            r["pareto"] = i in front
        return rows

    # --- JSON (controller sidecars, outcome tables) ------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The axes as recorded in sidecars and tables: ``{"token_granularities", "depth": L, "widths"}``."""
        return {"token_granularities": list(self.tokens), "depth": len(self.depths), "widths": list(self.widths)}

    @classmethod
    def from_json(cls, data: dict[str, Any], flops: np.ndarray) -> SettingsGrid:
        """A recorded grid (:meth:`to_json`) with its recorded FLOPs array (outcome tables store both)."""
        axes = cls.axes_of(data)
        if not isinstance(axes["depth"], int):
            raise ValueError(f"recorded grid has an unreadable depth axis: {data.get('depth')!r}")
        grid = cls(tuple(axes["token_granularities"]), tuple(range(1, axes["depth"] + 1)), tuple(axes["widths"]),
                   np.asarray(flops, dtype=np.int64))  # fmt: skip
        if grid.flops.shape != grid.shape:
            raise ValueError(f"recorded FLOPs have shape {grid.flops.shape}, the recorded grid {grid.shape}")
        return grid

    @staticmethod
    def axes_of(data: dict[str, Any]) -> dict[str, Any]:
        """Normalise a recorded grid (depth as ``L`` or as the list ``1..L``, as older tables wrote it)."""
        depth = data.get("depth")
        if isinstance(depth, list):
            depth = len(depth) if depth == list(range(1, len(depth) + 1)) else depth
        return {"token_granularities": list(data.get("token_granularities", [])), "depth": depth,
                "widths": list(data.get("widths", []))}  # fmt: skip

    def matches(self, data: dict[str, Any]) -> bool:
        """Whether a recorded grid (:meth:`to_json`, or an older table's form) has these axes."""
        return self.axes_of(data) == self.to_json()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SettingsGrid):
            return NotImplemented
        return self.to_json() == other.to_json() and np.array_equal(self.flops, other.flops)

    def __hash__(self) -> int:
        return hash((self.tokens, self.depths, self.widths))
