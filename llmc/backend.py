"""The Backend contract: how a Program becomes an artifact on disk and a runnable `Model` again.

A backend is a class with a registry name, a frozen dataclass of typed options, and three methods:

    lower(program, out_dir, options, overwrite) -> path   write the artifact, atomically
    load(folder) -> Model                                 run it (step / generate / perplexity)
    owns(folder) -> bool                                  whether a folder is one of its artifacts

Backends are found by name through the `llmc.backends` entry points (llmc.registry): the core
never imports one. `torch` (the eager reference, llmc.compiled) and `onnxruntime` are llmc's own.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

from llmc.errors import ArtifactError, ConfigError, LlmcError, did_you_mean
from llmc.registry import BACKENDS


@dataclass(frozen=True)
class NoOptions:
    """A backend without options."""


class Backend:
    """Base class of backends; see the module docstring."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def options(self, given=None):
        """The backend's Options from None (defaults), an Options instance, or a dict of values
        (strings are converted to the field's type, as pass specs are). ConfigError on a bad key or value."""
        from llmc.passes_base import convert_option

        if given is None:
            return self.Options()
        if isinstance(given, self.Options):
            return given
        if not isinstance(given, dict):
            raise ConfigError(f"backend '{self.name}' options must be a dict or {self.Options.__name__}, "
                              f"got {type(given).__name__}")
        fields = {f.name for f in dataclasses.fields(self.Options)}
        hints = typing.get_type_hints(self.Options)
        values = {}
        for key, value in given.items():
            if key not in fields:
                raise ConfigError(f"backend '{self.name}' has no option '{key}'{did_you_mean(key, fields)}; options: "
                                  f"{', '.join(sorted(fields)) or 'none'}")
            values[key] = convert_option(value, hints.get(key, str), f"{self.name}.{key}") if isinstance(
                value, str) else value
        try:
            return self.Options(**values)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"backend '{self.name}': {e}") from e

    def lower(self, program, out_dir: str, options=None, overwrite: bool = False) -> str:
        raise NotImplementedError

    def load(self, folder: str):
        raise NotImplementedError

    def owns(self, folder: str) -> bool:
        raise NotImplementedError


def get_backend(name: str) -> Backend:
    """The backend registered as `name`, instantiated; ConfigError naming the available ones otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"a backend is named by a string (see `llmc backends`), got {type(name).__name__}")
    cls = BACKENDS.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise LlmcError(f"the entry point of backend '{name}' is {cls!r}, not a Backend subclass")
    backend = cls()
    if backend.name != name:
        raise LlmcError(f"backend '{name}' is the class {cls.__qualname__}, whose name is '{backend.name}'")
    return backend


def available_backends() -> list[str]:
    return BACKENDS.names()


def owner(folder: str) -> Backend | None:
    """The backend that wrote `folder`, or None when no registered backend owns it."""
    for name in available_backends():
        backend = get_backend(name)
        if backend.owns(folder):
            return backend
    return None


def load(folder: str):
    """Open a folder written by any backend (`llmc compile ... -o DIR`) as a runnable Model."""
    import os

    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise ArtifactError(f"no such folder: {folder}")
    backend = owner(folder)
    if backend is not None:
        return backend.load(folder)
    raise ArtifactError(f"{folder} is not a compiled llmc model of any backend ({', '.join(available_backends())}); "
                        "compile one with `llmc compile MODEL -o DIR`")
