"""Finding an offline data source on disk."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import DataNotFoundError


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transferlab"


def find_source(name: str, user_path, system_paths, required: list[str], install_hint: str) -> Path:
    """First folder among user path, $TRANSFERLAB_DATA/<name>, system paths and the cache holding `required`."""
    if user_path is not None:  # an explicit path is the only place we look
        if all((Path(user_path) / r).exists() for r in required):
            return Path(user_path)
        raise DataNotFoundError(f"{name}: {user_path} does not contain {', '.join(required)}")
    candidates: list[Path] = []
    if os.environ.get("TRANSFERLAB_DATA"):
        candidates.append(Path(os.environ["TRANSFERLAB_DATA"]) / name)
    candidates += [Path(p) for p in system_paths]
    candidates.append(cache_dir() / name)
    for c in candidates:
        if all((c / r).exists() for r in required):
            return c
    raise DataNotFoundError(
        f"{name} data not found (looked in {', '.join(map(str, candidates))}); {install_hint}, "
        f"or set TRANSFERLAB_DATA to a folder containing {name}/"
    )
