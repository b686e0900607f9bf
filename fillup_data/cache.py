"""Where fillup-data keeps what it can make again: ``$FILLUP_CACHE`` (default ``~/.cache/fillup-data``).

Built-in models (``models/``), measured rates (``rates/``), compiled kernels (``inductor/``) and source
indexes (``index/``) live in one folder per kind below it. On a cluster, point ``FILLUP_CACHE`` at a
shared file system so that one machine's work serves the others.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("FILLUP_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fillup-data"


def cache_dir(kind: str) -> Path:
    """``$FILLUP_CACHE/<kind>`` (not created here)."""
    return cache_root() / kind
