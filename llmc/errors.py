"""The errors llmc raises. Each one tells the user what went wrong and what to do about it."""

from __future__ import annotations

import difflib


def did_you_mean(name: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a misspelt `name`, or ``."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class LlmcError(Exception):
    """Base class of every error llmc raises on purpose (the CLI prints these as one line)."""


class ConfigError(LlmcError, ValueError):
    """A pass, protocol or command option has a bad value."""


class ModelLoadError(LlmcError):
    """A model spec could not be resolved or loaded."""


class UnsupportedArchitectureError(LlmcError):
    """The model's architecture cannot be traced by llmc."""


class TraceError(LlmcError):
    """torch.export failed on a supported architecture."""


class PassOrderError(LlmcError):
    """A pass pipeline is ordered so that a pass lacks what it requires."""


class PassError(LlmcError):
    """A pass failed while running; the message names the pass and the passes run before it."""


class UnsupportedOpError(LlmcError):
    """A backend cannot lower some op of the program."""


class ExportError(LlmcError):
    """Writing an artifact failed."""


class ParityError(LlmcError):
    """A lowered artifact disagrees with the torch program."""


class NumericalError(LlmcError):
    """A model produced NaN or infinite logits (corrupt weights, or a pass that broke the model)."""


def check_finite(logits, where: str) -> None:
    """Raise NumericalError when `logits` (a torch tensor or a numpy array) hold a NaN or an infinity."""
    import numpy as np

    if isinstance(logits, np.ndarray):
        finite = bool(np.isfinite(logits).all())
    else:
        import torch

        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64, torch.float16):
            finite = bool(np.isfinite(logits.detach().numpy()).all())  # a vocabulary's logits: 6 against 100 us in torch
        else:
            finite = bool(torch.isfinite(logits).all())
    if not finite:
        raise NumericalError(f"the model produced NaN or infinite logits ({where}): its weights may be corrupt "
                             "(check the folder with `llmc verify DIR`) or a pass broke the model")


class ArtifactError(LlmcError):
    """A saved folder is missing, corrupt, or was written by an incompatible version."""


class DataError(LlmcError):
    """A data set could not be found or read."""
