"""Entry-point groups through which installed packages (this project included) register strategies and
adapters: checked once, loaded once per process."""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import ConfigError

_LOADED: set[str] = set()


def group_entry_points(group: str, what: str):
    """The group's entry points; none at all means the package is not installed (or a stale egg-info hides it)."""
    found = entry_points(group=group)
    if not found:
        raise ConfigError(
            f"no entry points in group {group!r}, so no built-in {what}: install the "
            "package (`pip install -e .`); a stale *.egg-info in the working directory hides them"
        )
    return found


def load_group(group: str, what: str) -> None:
    """Import every module the group names (they register themselves), once per process."""
    if group in _LOADED:
        return
    _LOADED.add(group)
    for ep in group_entry_points(group, what):
        ep.load()
