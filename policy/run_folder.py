"""A controller run folder that can stop and resume: progress rows and timing kept across parts.

``train_policy.py --resume RUN`` finishes RUN itself. The policy checkpoint (``policy.zip``) holds the timesteps it
was saved at; everything the run logged after that point (a SIGKILL between checkpoints) is dropped on resume, so
``progress.csv`` has each rollout once and ``timing.json`` sums exactly the parts that led to the final policy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import CSVOutputFormat

from backbone.fileio import write_json, write_text

PROGRESS = "progress.csv"
TIMING = "timing.json"
TIMESTEPS_KEY = "time/total_timesteps"


class ResumableCSV(CSVOutputFormat):
    """SB3's CSV writer that first keeps the rows of earlier parts logged at <= ``keep_until`` timesteps."""

    def __init__(self, filename: str | Path, keep_until: int = 0) -> None:
        path = Path(filename)
        lines = path.read_text().splitlines() if keep_until > 0 and path.is_file() else []
        keys: list[str] = []
        if lines:
            keys = next(csv.reader(lines[:1]))
            col = keys.index(TIMESTEPS_KEY) if TIMESTEPS_KEY in keys else None
            kept = [
                line
                for line, row in zip(lines[1:], csv.reader(lines[1:]), strict=True)
                if col is None or (row[col] and float(row[col]) <= keep_until)
            ]
            lines = [lines[0], *kept]
        write_text(path, "".join(line + "\n" for line in lines))  # atomic: earlier rows are never half lost
        self.file = path.open("r+")
        self.file.seek(0, 2)  # SB3 rewrites from the start only when new keys appear
        self.keys = keys
        self.separator = ","
        self.quotechar = '"'


class Timing:
    """Wall time of each part of a run (``tables_s``, ``ppo_s``), summed over parts in ``timing.json``."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.parts: list[dict[str, Any]] = []
        if resume and path.is_file():
            self.parts = list(json.loads(path.read_text()).get("parts", []))

    def write(self, part: dict[str, Any]) -> dict[str, Any]:
        """Record the running part (replacing its earlier record) and write the sums atomically."""
        parts = [*self.parts, {k: round(v, 1) if isinstance(v, float) else v for k, v in part.items()}]
        total = {key: round(sum(p.get(key, 0.0) for p in parts), 1) for key in ("tables_s", "ppo_s", "total_s")}
        data = {**total, "parts": parts}
        write_json(self.path, data)
        return data
