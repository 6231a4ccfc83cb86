"""`TritonModel`: run a folder written by the triton backend (generate, evaluate, step).

The folder holds the program as the torch backend saves it (in `program/`: the exported graph,
the weights in their compact form as safetensors, config, tokenizer, checksums) and
`llmc_triton.json`, which names the Triton kernels each llmc op runs. Opening it loads and verifies
the program with the core's loader, points every llmc op at its Triton op (`llmc_triton::*`), and:

- on a CUDA GPU: moves the graph and its weights to the GPU (floating tensors in `dtype`, bfloat16
  by default), and runs decode steps through `torch.compile` (dynamic shapes), the Triton ops opaque
  to it, and prompts eagerly (one compilation per model);
- on CPU under TRITON_INTERPRET=1: runs the graph eagerly (split per decoder layer, as the torch
  runtime does) with every kernel in Triton's interpreter; slow, meant for tests and checks;
- on CPU without the interpreter: opens (report / inspect work), and running it fails with one
  line saying what is needed.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import fx

from llmc.errors import ArtifactError, LlmcError
from llmc.model import Model
from llmc.trace import CacheTensor

TRITON_MANIFEST = "llmc_triton.json"
FORMAT = "llmc-triton"
FORMAT_VERSION = 1
PROGRAM_DIR = "program"


def is_triton_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRITON_MANIFEST))


def read_manifest(folder: str) -> dict:
    """The folder's llmc_triton.json, checked for format and version; ArtifactError otherwise."""
    path = os.path.join(folder, TRITON_MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{folder} is not an llmc Triton folder (no {TRITON_MANIFEST}); "
                            "compile one with `llmc compile MODEL --backend triton -o DIR`")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt ({e}); compile the model again") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{folder} is a {manifest.get('format')!r} folder of version "
                            f"{manifest.get('format_version')}; this llmc reads {FORMAT} version {FORMAT_VERSION}: "
                            "compile the model again")
    return manifest


def runtime_device(device: str | None = None) -> str:
    """The device a Triton folder runs on here: CUDA when present, else CPU under TRITON_INTERPRET=1.

    Raises one LlmcError line saying what is needed when neither is available (or triton is missing).
    """
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise LlmcError("running a Triton folder needs the triton package: pip install 'llmc[triton]' "
                        f"(triton==3.9.0) ({e})") from e
    from llmc.backends.triton.kernels import interpreter_enabled

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LlmcError("device='cuda' was asked for, but torch sees no CUDA GPU here; run on a GPU machine, "
                            "or on CPU with TRITON_INTERPRET=1")
        return device
    if device != "cpu":
        raise LlmcError(f"a Triton folder runs on 'cuda' or 'cpu' (interpreter), not {device!r}")
    if not interpreter_enabled():
        raise LlmcError("a Triton folder runs its kernels on a CUDA GPU, and none is visible here: run it on a "
                        "GPU machine, or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter "
                        "(slow; for tests)")
    return "cpu"


def place_graph(gm: fx.GraphModule, device: str, dtype: torch.dtype | None) -> None:
    """Move `gm`'s tensors to `device` (floating ones cast to `dtype`, if given) and retarget its nodes.

    The graph was traced on CPU in float32: nodes that create tensors name that device, and the
    attention bias names float32. RoPE stays float32 (its inverse frequencies and angles, as the
    model computes them) and its cos/sin are cast to `dtype` where they leave it; float32 extremes
    (the attention bias's finfo.min) become the new dtype's.
    """
    dev = torch.device(device)

    def keep_float32(name: str) -> bool:
        return "inv_freq" in name

    for mod_name, mod in gm.named_modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in list(store.items()):
                if v is None:
                    continue
                cast = dtype if dtype is not None and v.is_floating_point() and not keep_float32(k) else v.dtype
                new = v.detach().to(device=dev, dtype=cast)
                store[k] = torch.nn.Parameter(new, requires_grad=False) if isinstance(v, torch.nn.Parameter) else new
        for k, v in list(vars(mod).items()):  # lifted constants kept as plain attributes
            if isinstance(v, torch.Tensor) and k not in mod._parameters and k not in mod._buffers:
                cast = dtype if dtype is not None and v.is_floating_point() and not keep_float32(k) else v.dtype
                setattr(mod, k, v.to(device=dev, dtype=cast))
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        node.args = tuple(dev if isinstance(a, torch.device) else a for a in node.args)
        if dtype is not None:  # float32 extremes (the attention bias's finfo.min) to the new dtype's
            big = torch.finfo(dtype).max
            node.args = tuple(math.copysign(big, a) if isinstance(a, float) and math.isfinite(a) and abs(a) > big
                              else a for a in node.args)
        kwargs = dict(node.kwargs)
        if isinstance(kwargs.get("device"), torch.device):
            kwargs["device"] = dev
        creates = node.target in (torch.ops.aten.zeros.default, torch.ops.aten.full.default,
                                  torch.ops.aten.ones.default, torch.ops.aten.empty.memory_format)
        if dtype is not None and creates and kwargs.get("dtype") == torch.float32:
            kwargs["dtype"] = dtype
        node.kwargs = kwargs
        if dtype is not None and node.target in (torch.ops.aten.cos.default, torch.ops.aten.sin.default):
            with graph.inserting_after(node):
                cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
            cast.meta = {k: v for k, v in node.meta.items() if k != "val"}
            node.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
    graph.lint()
    gm.recompile()


class TritonModel(Model):
    """A Triton folder (see the module docstring) with the Model interface of every llmc runtime.

    `step(input_ids, attention_mask, position_ids, past) -> (logits, present)`: inputs may be CPU
    tensors; logits come back as float32 on CPU, the present cache stays on the run device.
    device: "cuda" or "cpu" (None: CUDA when present). dtype: floating weights and activations
    (None: bfloat16 on CUDA, float32 on CPU). compile: run through torch.compile (None: on CUDA; a
    string names the torch.compile backend, e.g. "aot_eager" to check the graph traces on CPU).
    """

    backend = "triton"

    def __init__(self, folder: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                 compile: bool | str | None = None):
        from llmc.compiled import load as load_program
        from llmc.fsutil import verify_folder
        from llmc.runner import TorchRunner, last_position_variant

        from llmc.backends.triton import ops as triton_ops

        folder = os.path.abspath(folder)
        if not os.path.isdir(folder):
            raise ArtifactError(f"no such folder: {folder}")
        self.manifest = read_manifest(folder)
        verify_folder(folder)  # sizes and sha256 of every file, as the core writes them (checksums.json)
        known = {k for _, ks in triton_ops.LOWERING.values() for k in ks}
        unknown = sorted({k for ks in self.manifest.get("kernels", {}).values() for k in ks} - known)
        if unknown:
            raise ArtifactError(f"{folder} needs Triton kernels this llmc does not have ({', '.join(unknown)}); "
                                "compile it again with this version")
        # Without a GPU or the interpreter the folder still opens (inspect, report); running it raises this.
        self._unavailable = None
        try:
            self.device = runtime_device(device)
        except LlmcError as e:
            self._unavailable, self.device = str(e), "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise LlmcError(f"dtype must be a floating torch dtype (float32, float16, bfloat16), got {dtype!r}")
        self.folder = folder
        # verify=False: verify_folder above has checked every file, program/ included
        self.program = load_program(os.path.join(folder, self.manifest.get("program", PROGRAM_DIR)),
                                    verify=False).program
        missing = triton_ops.unsupported_ops(self.program.gm)
        if missing:
            raise ArtifactError(f"{folder}: the graph calls llmc ops without a Triton kernel ({', '.join(missing)})")
        self.op_counts = triton_ops.rewrite_graph(self.program.gm)
        gm = self.program.gm
        if self.device != "cpu" or self.dtype != torch.float32:
            place_graph(gm, self.device, None if self.dtype == torch.float32 else self.dtype)
        self.compiled = self.device != "cpu" if compile is None else compile
        self._runner = None
        if self._unavailable:
            pass
        elif self.compiled:  # True: Inductor; a string names another torch.compile backend
            backend = self.compiled if isinstance(self.compiled, str) else "inductor"
            # Decode steps run compiled; a prompt runs eagerly (its last position only): one compilation
            # per model, since torch.compile specializes the sizes 0 and 1 (an empty past, one new token).
            self._full = torch.compile(gm, dynamic=True, backend=backend)
            self._last = last_position_variant(gm) or gm
        else:
            self._runner = TorchRunner(self.program)
            self._runner.prepare()
        self.cache_layout = [CacheTensor.from_json(c) for c in self.manifest["cache_layout"]]
        self.eos_ids = tuple(self.program.eos_ids)
        self.tokenizer = self.program.tokenizer

    # -- running ---------------------------------------------------------------------------
    def _inputs(self, input_ids, attention_mask, position_ids, past):
        dev = self.device
        past = [p if p.device.type == torch.device(dev).type and (not p.is_floating_point() or p.dtype == self.dtype)
                else p.to(device=dev, dtype=self.dtype if p.is_floating_point() else p.dtype) for p in past]
        return input_ids.to(dev), attention_mask.to(dev), position_ids.to(dev), past

    def _run(self, fn_compiled, last: bool, input_ids, attention_mask, position_ids, past):
        if self._unavailable:
            raise LlmcError(self._unavailable)
        args = self._inputs(torch.as_tensor(input_ids), torch.as_tensor(attention_mask),
                            torch.as_tensor(position_ids), past)
        if self._runner is not None:
            run = self._runner.step_last if last else self._runner.step
            logits, present = run(*args)
        else:
            with torch.inference_mode():
                logits, present = fn_compiled(args[0], args[1], args[2], list(args[3]))
            present = list(present)
            if last:
                logits = logits[:, -1:]
        return logits.float().cpu(), present

    def step(self, input_ids, attention_mask, position_ids, past):
        """One decode step through the Triton kernels: logits [B, S, V] (float32, CPU) and the present cache."""
        return self._run(getattr(self, "_full", None), False, input_ids, attention_mask, position_ids, past)

    def prefill_step(self, input_ids, attention_mask, position_ids, past):
        """Like `step`, with logits [B, 1, V] of the last position only."""
        return self._run(getattr(self, "_last", None), True, input_ids, attention_mask, position_ids, past)

    def empty_cache(self, batch: int, past_len: int = 0) -> list[torch.Tensor]:
        cache = super().empty_cache(batch, past_len)
        return [c.to(device=self.device, dtype=self.dtype if c.is_floating_point() else c.dtype) for c in cache]

    # -- reporting -------------------------------------------------------------------------
    def report(self) -> dict:
        """History, cache layout, op histogram (the Triton ops), kernels per op, sizes, run device."""
        from llmc.graph import count_ops

        files = {}
        for root, _, names in os.walk(self.folder):
            for n in names:
                path = os.path.join(root, n)
                files[os.path.relpath(path, self.folder)] = os.path.getsize(path)
        size = self.program.size_report()
        size["files"] = dict(sorted(files.items()))
        return {"name": self.program.name, "source": self.program.source, "backend": self.backend,
                "architecture": getattr(self.program.config, "model_type", "?"), "layers": self.program.num_layers,
                "history": [h.to_json() for h in self.program.history],
                "cache_layout": self.manifest["cache_layout"],
                "ops": dict(count_ops(self.program.gm).most_common()),
                "kernels": self.manifest.get("kernels", {}),
                "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "compiled": self.compiled, "size": size}
