"""Passes and backends by name: one registry per kind, fed by entry points.

llmc's own passes and backends are entry points of the installed distribution (groups
`llmc.passes` and `llmc.backends` in pyproject.toml), and so are those of any other installed
package: the core never imports `llmc.passes` or `llmc.backends` by name, and a package outside
llmc adds a pass with one line in its own metadata:

    [project.entry-points."llmc.passes"]
    my_pass = "my_package.module:MyPass"

An entry point is loaded only when its name is asked for (listing loads them all). Objects
registered in this process (`@register_pass` on a class defined in a script or a test) are
found too, and take precedence over an entry point of the same name.
"""

from __future__ import annotations

import importlib.metadata

from llmc.errors import ConfigError, LlmcError, did_you_mean


class Registry:
    """Name -> object for one entry-point group."""

    def __init__(self, group: str, kind: str, command: str):
        self.group = group
        self.kind = kind          # "pass" / "backend": used in messages
        self.command = command    # the CLI command that lists them
        self._local: dict[str, object] = {}
        self._loaded: dict[str, object] = {}

    def register(self, name: str, obj) -> None:
        """Register `obj` under `name` in this process."""
        current = self._local.get(name)
        if current is not None and current is not obj:
            raise LlmcError(f"{self.kind} name '{name}' is registered twice ({current!r}, {obj!r})")
        self._local[name] = obj

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every name, registered or installed, without loading anything."""
        return sorted(set(self._entry_points()) | set(self._local))

    def get(self, name: str):
        """The object registered as `name`; a ConfigError naming the close matches when there is none."""
        if name in self._local:
            return self._local[name]
        if name in self._loaded:
            return self._loaded[name]
        ep = self._entry_points().get(name)
        if ep is None:
            names = self.names()
            raise ConfigError(f"unknown {self.kind} '{name}'{did_you_mean(name, names)}; available: {', '.join(names) or 'none'} "
                              f"(see `{self.command}`)")
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin names itself, not a bare ImportError from deep inside
            dist = getattr(ep.dist, "name", "?")
            raise LlmcError(f"cannot load {self.kind} '{name}' ({ep.value}, from the package {dist}): "
                            f"{type(e).__name__}: {e}") from e
        self._loaded[name] = obj
        return obj

    def all(self) -> dict:
        """Every object by name (loads every entry point)."""
        return {name: self.get(name) for name in self.names()}


PASSES = Registry("llmc.passes", "pass", "llmc passes")
BACKENDS = Registry("llmc.backends", "backend", "llmc backends")
