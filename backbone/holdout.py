"""The policy split of an image folder with only ``train/``: a deterministic, class-stratified hold-out.

A controller must never learn on images the backbone trained on (DESIGN §4). When a user has only ``train/`` and
``test/``, backbone training keeps a fraction of every class of ``train/`` aside; which files is decided by the
sha256 of each file's path relative to ``train/`` (lowest hashes first), so the choice does not depend on listing
order, file system or machine, and it is recorded in the backbone checkpoint for the policy side to use exactly.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from backbone.data import DataError

RULE = "sha256-of-relative-path, lowest first, per class"


def _rank(relpath: str) -> str:
    return hashlib.sha256(relpath.encode()).hexdigest()


def stratified_holdout(samples: list[tuple[str, int]], fraction: float) -> list[str]:
    """Relative paths of the held-out files: ``round(fraction * n_c)`` (at least 1) of each class's ``n_c`` files.

    Args:
        samples: ``(path relative to the split folder, class index)`` of every file of ``train/``.
        fraction: Share of each class to hold out, in (0, 1).

    Returns:
        The held-out relative paths, sorted.

    Raises:
        DataError: If ``fraction`` is outside (0, 1) or a class would keep no training image.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"policy_fraction must be in (0, 1), got {fraction}")
    by_class: dict[int, list[str]] = defaultdict(list)
    for relpath, label in samples:
        by_class[label].append(relpath)
    held: list[str] = []
    for label in sorted(by_class):
        files = sorted(by_class[label], key=_rank)
        k = max(1, round(fraction * len(files)))
        if k >= len(files):
            cls = files[0].split("/")[0]
            raise DataError(
                f"class {cls!r} has {len(files)} image(s) in train/: too few to hold out a policy split "
                f"(policy_fraction={fraction}); add images or a policy-train/ folder"
            )
        held += files[:k]
    return sorted(held)
