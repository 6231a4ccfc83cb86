"""CompiledModel: a Program ready to run, generate, evaluate, save and load; the `torch` backend."""

from __future__ import annotations

import copy
import json
import os
import platform
import time
import warnings

import torch

from llmc.backend import Backend
from llmc.errors import ArtifactError
from llmc.fsutil import atomic_folder, file_sha256, verify_folder
from llmc.graph import strip_runtime_noops
from llmc.model import Model
from llmc.program import PassRecord, Program
from llmc.progress import log
from llmc.runner import TorchRunner
from llmc.trace import CacheTensor

FORMAT = "llmc-program"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPH_FILE = "graph.pt2"
WEIGHTS_FILE = "weights.safetensors"


def versions() -> dict:
    """Versions of the packages an artifact depends on."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("llmc", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


class CompiledModel(Model):
    """A compiled Program in eager PyTorch: call it, `generate()` text, `save()` it, `report()` on it.

    `step(input_ids, attention_mask, position_ids, past) -> (logits, present)` is the traced decode
    step; `__call__` is the same with defaults (full attention mask, positions after the past).
    """

    backend = "torch"

    def __init__(self, program: Program):
        self.program = program
        self._runner = TorchRunner(program)
        self._runner.prepare()

    # -- running ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.program.tokenizer

    def step(self, input_ids, attention_mask, position_ids, past):
        """One decode step of the traced graph (no autograd)."""
        return self._runner.step(input_ids, attention_mask, position_ids, past)

    @property
    def cache_layout(self):
        return self.program.cache_layout

    @property
    def eos_ids(self) -> tuple:
        return self.program.eos_ids

    def prefill_step(self, input_ids, attention_mask, position_ids, past):
        """A decode step returning logits of the last position only (generation's prefill)."""
        return self._runner.step_last(input_ids, attention_mask, position_ids, past)

    # -- reporting -------------------------------------------------------------------------
    def __repr__(self) -> str:
        p = self.program
        passes = ", ".join(h.spec for h in p.history) or "none"
        size = p.size_report()
        bits = size.get("decoder_linear_bits_per_param")
        return (f"<CompiledModel {p.name!r} ({getattr(p.config, 'model_type', '?')}, {p.num_layers} layers), passes: "
                f"{passes}; {size['total_bytes'] / 1e6:.1f} MB of weights"
                + (f", {bits:.2f} bits/param over decoder linears" if bits is not None else "") + ">")

    def report(self) -> dict:
        """Name, source, pass history, cache layout, op histogram and size report."""
        from llmc.graph import count_ops

        return {
            "name": self.program.name,
            "source": self.program.source,
            "backend": self.backend,
            "architecture": getattr(self.program.config, "model_type", "?"),
            "layers": self.program.num_layers,
            "history": [h.to_json() for h in self.program.history],
            "cache_layout": [c.to_json() for c in self.program.cache_layout],
            "ops": dict(count_ops(self.program.gm).most_common()),
            "size": self.program.size_report(),
        }

    # -- saving ----------------------------------------------------------------------------
    def save(self, directory: str, overwrite: bool = False) -> str:
        """Save to `directory` (see `save_program`)."""
        return save_program(self.program, directory, overwrite)


def save_program(program: Program, directory: str, overwrite: bool = False) -> str:
    """Save a Program to `directory`: weights.safetensors, graph.pt2, config, tokenizer, manifest.json.

    Written to a temporary sibling folder and renamed at the end, so a failure leaves nothing.
    """
    directory = os.path.abspath(directory)
    t0 = time.perf_counter()
    log(f"saving to {directory}")
    with atomic_folder(directory, overwrite) as tmp:
        _write(program, tmp)
    log(f"saved in {time.perf_counter() - t0:.1f} s")
    return directory


def _write(program: Program, folder: str) -> None:
    from safetensors.torch import save_file

    ep = program.exported()
    state = {k: v for k, v in ep.state_dict.items()}
    state.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    # Tied tensors are stored once; the manifest records the aliases.
    unique, aliases, seen = {}, {}, {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            unique[k] = v.detach().contiguous()
    save_file(unique, os.path.join(folder, WEIGHTS_FILE))
    # The graph without its weights: every state tensor is swapped for a stride-0 placeholder.
    light = copy.copy(ep)
    light._state_dict = {k: _placeholder(v) for k, v in ep.state_dict.items()}
    light._constants = {k: _placeholder(v) if isinstance(v, torch.Tensor) else v for k, v in ep.constants.items()}
    with warnings.catch_warnings():  # the placeholders are not "complete tensors"; that is the point
        warnings.simplefilter("ignore", UserWarning)
        torch.export.save(light, os.path.join(folder, GRAPH_FILE))
    program.config.to_json_file(os.path.join(folder, "config.json"))
    if program.tokenizer is not None:
        program.tokenizer.save_pretrained(folder)
    # every file's size and sha256 go to checksums.json (llmc.fsutil.atomic_folder), not to the manifest
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": program.name,
        "source": program.source, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(), "aliases": aliases,
        "cache_layout": [c.to_json() for c in program.cache_layout],
        "linear_shapes": {k: list(v) for k, v in program.linear_shapes.items()},
        "eos_ids": list(program.eos_ids),
        "history": [h.to_json() for h in program.history],
    }
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    p = torch.zeros((), dtype=t.dtype).expand(t.shape)
    return torch.nn.Parameter(p, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else p


class TorchBackend(Backend):
    """The eager PyTorch reference: a folder with the exported graph (graph.pt2), its weights in
    their compact form (weights.safetensors), config, tokenizer and manifest."""

    name = "torch"

    def lower(self, program: Program, out_dir: str, options=None, overwrite: bool = False) -> str:
        self.options(options)
        return save_program(program, out_dir, overwrite=overwrite)

    def load(self, folder: str) -> CompiledModel:
        return load(folder)

    def owns(self, folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, MANIFEST))  # `load` says what is wrong with one


def load(directory: str, verify: bool = True) -> CompiledModel:
    """Load a folder written by `CompiledModel.save`, refusing a corrupt or incompatible one.

    `verify=False` skips the checksums, for a caller that has just verified an enclosing folder."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from llmc.tokenizer import load_tokenizer

    import llmc.ops  # noqa: F401  (registers llmc custom ops the graph may call)

    directory = os.path.abspath(directory)
    mpath = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ArtifactError(f"no such folder: {directory}")
    if not os.path.isfile(mpath):
        raise ArtifactError(f"{directory} is not a compiled llmc model (no {MANIFEST}); "
                            "compile one with `llmc compile MODEL -o DIR`")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt ({e}); recompile the model") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{directory} is not an llmc program folder (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} has format version {manifest.get('format_version')}, this llmc reads "
                            f"{FORMAT_VERSION}; recompile it with this version")
    saved_torch = manifest.get("versions", {}).get("torch", "")
    if saved_torch.split(".")[:2] != torch.__version__.split(".")[:2]:
        raise ArtifactError(f"{directory} was saved with torch {saved_torch}, this is torch {torch.__version__}: "
                            "exported graphs are not portable across torch releases; recompile it")
    # every file (checksums.json); folders saved before it: the manifest's own list of digests
    verified = not verify or verify_folder(directory) is not None
    for name, digest in ({} if verified else manifest.get("files", {})).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ArtifactError(f"{directory} is incomplete: {name} is missing; recompile the model")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{directory} is corrupt: {name} does not match its checksum; recompile the model")
    try:
        ep = torch.export.load(os.path.join(directory, GRAPH_FILE))
        state = load_file(os.path.join(directory, WEIGHTS_FILE))
        for alias, target in manifest.get("aliases", {}).items():
            state[alias] = state[target]
        gm = ep.module()
        strip_runtime_noops(gm)
        result = gm.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys:
            raise ArtifactError(f"{directory} is corrupt: weights missing for {', '.join(result.missing_keys[:5])}")
        for name in result.unexpected_keys:  # non-persistent buffers (e.g. rotary inv_freq) and constants
            module_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(module_name) if module_name else gm
            if not hasattr(owner, leaf):
                raise ArtifactError(f"{directory} is corrupt: the graph has no tensor {name}")
            setattr(owner, leaf, state[name])
        config = AutoConfig.from_pretrained(directory)
        tokenizer = load_tokenizer(directory)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"cannot load {directory}: {type(e).__name__}: {e}") from e
    program = Program(
        gm, config, [CacheTensor.from_json(c) for c in manifest["cache_layout"]], tokenizer,
        manifest.get("name", "model"),
        [PassRecord(h["name"], h["spec"], h["config"], h["stats"], h["seconds"]) for h in manifest.get("history", [])],
        {k: tuple(v) for k, v in manifest.get("linear_shapes", {}).items()}, manifest.get("source", ""),
        eos_ids=tuple(manifest.get("eos_ids", ())))
    return CompiledModel(program)
