"""Where the embedded deployment keeps its files, resolved once for the database and the store.

Kept apart from `db.session` so the artifact store can find its folder without importing
SQLAlchemy. Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "BITPLAN_HOME"
DEFAULT_HOME = "bitplan-data"


def bitplan_home() -> Path:
    """`$BITPLAN_HOME`, else `./bitplan-data`, made absolute so a later chdir cannot move it."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()


def cache_folder() -> Path:
    """Where jobs keep what they computed by content (`allocator.cache.FolderCache`): shared by
    the CLI's jobs and every worker with this home."""
    return bitplan_home() / "cache"
