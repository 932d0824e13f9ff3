"""triserve's on-disk cache, shared by the backends: unpacked execution environments and
converted models, each in a folder named by the SHA-256 of what it was made from, so
that a restart finds its work done and a changed file never reuses a stale result."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """``$TRISERVE_CACHE_DIR/<kind>`` (default ``~/.cache/triserve/<kind>``)."""
    root = os.environ.get("TRISERVE_CACHE_DIR") or Path.home() / ".cache" / "triserve"
    return Path(root) / kind


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
