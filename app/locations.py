"""Where the app keeps its data by default; light to import (`personalize app --help` shows it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_workspace() -> Path:
    """The per-user data folder: $XDG_DATA_HOME/personalize, or the platform's usual place."""
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]) / "personalize"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "personalize"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "personalize"
    return Path.home() / ".local" / "share" / "personalize"
