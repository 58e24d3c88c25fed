"""Files: atomic writes, JSON, hashes, and where the package's own data and caches live.

Every file this package writes goes through :func:`atomic_write` (temp file, then rename), so a crash or Ctrl-C
never leaves a half-written checkpoint, table or report behind. Data the code needs at run time (the shipped
checkpoint, YAML defaults) is package data read with :mod:`importlib.resources`, so a plain ``pip install .`` works
from any folder; caches go under the user cache directory, never into the source tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs

APP_NAME = "adaperceiver-rl"


def packaged_file(package: str, name: str) -> Path:
    """Path of a data file shipped inside ``package`` (e.g. ``("configs", "policy.yaml")``).

    Installed packages are plain folders (wheel or editable install), so the resource is a real file.
    """
    return Path(str(resources.files(package).joinpath(name)))


def user_cache_dir(*parts: str) -> Path:
    """The platform's user cache folder of this package (``~/.cache/adaperceiver-rl`` on Linux) joined with parts."""
    return Path(platformdirs.user_cache_dir(APP_NAME)).joinpath(*parts)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Atomic JSON write that also accepts numpy/torch scalars and arrays."""
    write_text(path, json.dumps(data, indent=indent, default=_json_default))


def write_json_and_markdown(out: str | os.PathLike, stem: str, result: Any, markdown: str) -> tuple[Path, Path]:
    """A command's report: ``OUT/STEM.json`` (the figures) and ``OUT/STEM.md`` (the same as tables), both atomic."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{stem}.json", out / f"{stem}.md"
    write_json(paths[0], result, indent=1)
    write_text(paths[1], markdown)
    return paths


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; ValueError naming the file if it is not JSON (a truncated or foreign file)."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def display_path(path: str | os.PathLike) -> str:
    """Relative to the working directory when possible, so committed reports do not name one machine's folders."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
