"""The folders of assayer's own files: launched Redis servers, passwords, worker logs."""

import os
from pathlib import Path

STATE_DIR_ENV = "XDG_STATE_HOME"


def state_dir() -> Path:
    """Return `$XDG_STATE_HOME/assayer`, or `~/.local/state/assayer` when it is unset."""
    base = os.environ.get(STATE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "assayer"


def log_dir() -> Path:
    """Return the folder of the worker pool logs, creating it."""
    path = state_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def private_dir(*parts: str) -> Path:
    """Return a folder under the state folder that only the user can read, creating it."""
    path = state_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
