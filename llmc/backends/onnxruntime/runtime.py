"""`OrtModel`: run an ONNX folder written by the onnxruntime backend (generate, evaluate, step)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
import torch

from llmc.errors import ArtifactError, ConfigError, check_finite
from llmc.fsutil import verify_folder
from llmc.generation import cut_at_stop, left_pad, position_ids_from_mask
from llmc.model import Model
from llmc.progress import bar
from llmc.trace import INPUT_NAMES, CacheTensor

ONNX_MANIFEST = "llmc_onnx.json"


def is_onnx_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ONNX_MANIFEST))


def _length(cache_tensor) -> int:
    """The sequence length (dim 2) of a cache tensor: an OrtValue, a torch tensor or an array."""
    shape = cache_tensor.shape() if callable(getattr(cache_tensor, "shape", None)) else cache_tensor.shape
    return int(shape[2])


def _check_positions(mask: np.ndarray, positions: np.ndarray) -> None:
    """Raise unless the positions of the step's real tokens (mask 1) count each row's tokens from its first: the
    token at index i of a row with `pad` leading zeros in the mask is at position i - pad
    (llmc.generation.position_ids_from_mask)."""
    total, steps = mask.shape[1], positions.shape[1]
    if mask.shape[0] == 1 and steps == 1:  # one row's decode step, in scalars (a few microseconds a token)
        if mask[0, -1] != 0 and positions[0, 0] != total - 1 - mask[0].argmax():
            raise ValueError(_POSITIONS)
        return
    pad = (mask != 0).argmax(1)
    want = np.arange(total - steps, total) - pad[:, None]
    real = mask[:, total - steps:] != 0
    if not np.array_equal(positions[real], want[real]):
        raise ValueError(_POSITIONS)


_POSITIONS = ("this export's attention places each token at its index in the cache (the fused lowering's "
              "RotaryInAttention) and takes only position_ids that count a row's tokens from its first "
              "(llmc.generation.position_ids_from_mask); export with fuse=false for other positions")


class OrtModel(Model):
    """An exported folder in an ONNX Runtime session, with the Model interface of every llmc runtime.

    `step(input_ids, attention_mask, position_ids, past) -> (logits, present)` takes and returns
    torch tensors (shared with ORT's numpy buffers, no copies on the way out).

    A folder whose manifest says `"cache_buffers": "shared"` (the fused lowering's GroupQueryAttention)
    takes the past's length from the mask: its cache tensors are buffers of some capacity whose first
    `attention_mask.shape[1] - input_ids.shape[1]` positions are the past, and a step writes its keys and
    values into the buffers it is given and returns them. So `present` may be longer than the valid length
    (the mask says how much is valid), and a past passed to `step` must not be used again for another
    continuation (select or copy its rows first, as llmc.search.reorder_cache does).

    A folder whose attention rotates q and k itself (`"RotaryInAttention"` in the manifest's fusions) takes the
    positions llmc.generation.position_ids_from_mask gives (each row's tokens counted from its first) and raises
    ValueError on others.
    """

    def __init__(self, folder: str, threads: int | None = None, prefill_session: bool = True):
        import onnxruntime as ort

        from llmc.tokenizer import load_tokenizer

        folder = os.path.abspath(folder)
        if not is_onnx_folder(folder):
            raise ArtifactError(f"{folder} is not an llmc ONNX folder (no {ONNX_MANIFEST}); "
                                "export one with `llmc compile MODEL --backend onnxruntime -o DIR`")
        try:
            with open(os.path.join(folder, ONNX_MANIFEST)) as f:
                self.manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{folder}/{ONNX_MANIFEST} is corrupt ({e}); export the model again") from e
        model_path = os.path.join(folder, self.manifest.get("model_file", "model.onnx"))
        for name in (self.manifest.get("model_file", "model.onnx"), self.manifest.get("data_file", "model.onnx.data")):
            if not os.path.isfile(os.path.join(folder, name)):
                raise ArtifactError(f"{folder} is incomplete: {name} is missing; export the model again")
        verify_folder(folder)  # sizes and sha256 of every file, when the export recorded them
        self._threads = threads
        self._library = None
        if self.manifest.get("custom_ops_library"):  # llmc's custom ops (llmc.backends.onnxruntime.custom_ops)
            self._library = os.path.join(folder, self.manifest["custom_ops_library"])
            if not os.path.isfile(self._library):
                raise ArtifactError(f"{folder} is incomplete: its custom-op library {self._library} is missing; "
                                    "export the model again")
        self.session = self._open(model_path)
        # A second session on the last-position variant makes generation's prefill skip lm_head for
        # all but the last prompt token; it costs a second in-memory copy of the weights.
        prefill = self.manifest.get("prefill_file")
        # Its threads do not spin-wait after a run: spinning workers of an idle session take the cores from the
        # decode session's first steps (SmolLM2 4-bit, batch 1: the first 4 steps 12-17 instead of 7-10 ms).
        self.prefill_session = self._open(os.path.join(folder, prefill), spin=False) \
            if prefill and prefill_session else None
        self.folder = folder
        self.cache_layout = [CacheTensor.from_json(c) for c in self.manifest["cache_layout"]]
        self.eos_ids = tuple(self.manifest.get("eos_ids", ()))
        self.tokenizer = load_tokenizer(folder)
        self.output_names = ["logits"] + [c.output_name for c in self.cache_layout]
        # ONNX Runtime's CPU GroupQueryAttention refuses a step of more than one token after a past at
        # batch > 1: such steps run one row at a time (`_run_rows`)
        self._rows_one_at_a_time = bool(self.manifest.get("fusions", {}).get("GroupQueryAttention"))
        # a graph whose attention rotates q and k itself (the fused lowering's RotaryInAttention) places every token
        # at its index in the cache buffer and ignores position_ids: it takes only positions that count a row's
        # tokens from its first (`_check_positions`)
        self._positions_at_index = bool(self.manifest.get("fusions", {}).get("RotaryInAttention"))
        # a graph that takes the past's length from the mask reads and writes each cache tensor in place: one
        # buffer per tensor, bound as both past and present (`_buffers`)
        self.shared_buffers = self.manifest.get("cache_buffers") == "shared"
        self._bound: dict = {}  # id(session) -> (its IO binding, the cache buffers bound to it, their capacity)
        self._logits_layout: dict = {}  # id(session) -> (sequence dim, vocabulary, dtype) of its logits

    def _open(self, path: str, spin: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self._threads:
            opts.intra_op_num_threads = self._threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._library:
            try:
                opts.register_custom_ops_library(self._library)
            except Exception as e:
                raise ArtifactError(f"ONNX Runtime cannot load llmc's custom ops {self._library} ({e}); export the "
                                    "folder again on this machine, or with vq_lowering='dequantize' for standard "
                                    "ONNX") from e
        try:
            return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {type(e).__name__}: {e}") from e

    def generate(self, prompts, max_new_tokens: int = 20, **kwargs):
        """`Model.generate`; greedy decoding of a folder with shared cache buffers runs `greedy_tokens` (numpy
        alone between the steps), everything else `llmc.generation.generate_tokens` over `step`. Torch is on one
        thread while it runs: ONNX Runtime's threads do the work, and torch's OpenMP workers, woken by a parallel
        op, would keep spinning on the same cores through the next step (SmolLM2 4-bit at batch 8: 27.9 against
        21.2 ms per step)."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().generate(prompts, max_new_tokens, **kwargs)
        finally:
            torch.set_num_threads(previous)
            self._bound.clear()  # let the cache buffers go

    def _generate_tokens(self, prompts, cfg, pad_id, stop_ids, progress):
        if cfg.do_sample or not self.shared_buffers:
            return super()._generate_tokens(prompts, cfg, pad_id, stop_ids, progress)
        steps = list(self.greedy_tokens(prompts, cfg.max_new_tokens, pad_id, stop_ids, progress=progress))
        return cut_at_stop(np.stack(steps, 1).tolist() if steps else [[] for _ in prompts], stop_ids)

    def greedy_tokens(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0, stop_ids=(),
                      progress: bool = False) -> Iterator[np.ndarray]:
        """Greedy decoding of token-id prompts, one step per item: yields each step's tokens, an int64 array [batch]
        (`pad_id` for a row after its stop id), until `max_new_tokens` steps or every row has stopped. The tokens
        and their order are `llmc.generation.generate_tokens`'s (left padding, Hugging Face's positions).

        Between two steps only numpy runs (no torch): the cache is allocated once for the prompt and every new
        token and stays bound, as past and present, to the decode and prefill sessions; the token, position and
        logits arrays are bound once and rewritten in place. Needs a folder with shared cache buffers (the
        fused lowering's, `self.shared_buffers`)."""
        import onnxruntime as ort

        if not self.shared_buffers:
            raise ConfigError(f"{self.folder} has concatenated cache tensors ({ONNX_MANIFEST} cache_buffers); "
                              "greedy_tokens needs an export with the fused lowering (fuse=true), or use generate")
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return
        ids, mask = (t.numpy() for t in left_pad(prompts, pad_id))
        batch, width = ids.shape
        total = width + max_new_tokens - 1  # the last token is never fed back
        masks = np.ones((batch, total), np.int64)
        masks[:, :width] = mask
        stop = np.array(sorted(set(stop_ids)), np.int64)
        cache = self._buffers(self.empty_cache(batch), width, width, capacity=total)  # the prompt, room for all

        def bound(session, steps: int):
            binding = session.io_binding()
            self._bind_cache(binding, cache)
            logits = self._logits_array(session, batch, steps)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            return binding, logits

        def pick(logits: np.ndarray, done: np.ndarray, step: int) -> np.ndarray:
            last = logits[:, -1]
            check_finite(last, f"generating token {step}")
            tokens = np.where(done, pad_id, last.argmax(-1))
            done |= np.isin(tokens, stop)
            return tokens

        with bar(total=max_new_tokens, desc="generating", unit="token", enabled=progress) as pbar:
            session = self.prefill_session or self.session
            binding, logits = bound(session, width)
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            binding.bind_cpu_input("position_ids", position_ids_from_mask(torch.from_numpy(mask)).numpy())
            session.run_with_iobinding(binding)
            done = np.zeros(batch, bool)
            tokens = pick(logits, done, 1)
            del binding, logits
            binding, logits = bound(self.session, 1)
            fed, positions = tokens[:, None].copy(), mask.sum(1, keepdims=True) - 1
            binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(fed))
            binding.bind_ortvalue_input("position_ids", ort.OrtValue.ortvalue_from_numpy(positions))
            for t in range(1, max_new_tokens + 1):
                pbar.update(1)
                yield tokens
                if t == max_new_tokens or done.all():
                    return
                fed[:, 0] = tokens
                positions += 1
                binding.bind_cpu_input("attention_mask", np.ascontiguousarray(masks[:, :width + t]))
                self.session.run_with_iobinding(binding)
                tokens = pick(logits, done, t + 1)

    def step(self, input_ids, attention_mask, position_ids, past):
        """One decode step in ONNX Runtime (see `_run`)."""
        return self._run(self.session, input_ids, attention_mask, position_ids, past)

    def prefill_step(self, input_ids, attention_mask, position_ids, past):
        """Like `step`, with logits of the last position only when the folder has a prefill graph."""
        if self.prefill_session is None:
            logits, present = self.step(input_ids, attention_mask, position_ids, past)
            return logits[:, -1:], present
        return self._run(self.prefill_session, input_ids, attention_mask, position_ids, past)

    def _run(self, session, input_ids, attention_mask, position_ids, past):
        """One decode step in ONNX Runtime, through IO binding.

        `past` is what the previous step returned (ORT-owned OrtValues, bound as inputs without a
        copy) or torch tensors (e.g. `empty_cache`). Returns logits as a torch tensor and the
        present cache as OrtValues; `.numpy()` on one gives its values.
        """
        import onnxruntime as ort

        if self._rows_one_at_a_time and input_ids.shape[0] > 1 and input_ids.shape[1] > 1 and past \
                and _length(past[0]) > 0:
            return self._run_rows(session, input_ids, attention_mask, position_ids, past)
        keep = []  # numpy inputs must outlive the run
        inputs = []
        for name, t in zip(INPUT_NAMES, (input_ids, attention_mask, position_ids)):
            arr = np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t, dtype=np.int64)
            keep.append(arr)
            inputs.append((name, arr))
        if self._positions_at_index:
            _check_positions(keep[1], keep[2])
        if self.shared_buffers:
            # the buffers stay bound from one step to the next while they have room (a decode rebinds only the
            # ids, the mask, the positions and the logits: 2 x layers fewer calls into ONNX Runtime per step)
            total = attention_mask.shape[1]
            bound = self._bound.get(id(session))
            if bound is not None and bound[2] >= total and (past is bound[1] or len(bound[1]) == len(past)
                                                            and all(a is b for a, b in zip(bound[1], past))):
                binding, past = bound[0], bound[1]
            else:
                past = self._buffers(past, total, input_ids.shape[1])
                binding = session.io_binding()
                self._bind_cache(binding, past)
                self._bound[id(session)] = (binding, past, min(map(_length, past)))
            for name, arr in inputs:
                binding.bind_cpu_input(name, arr)
            logits = self._logits_array(session, *input_ids.shape)  # new each step: a returned one stays intact
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
            session.run_with_iobinding(binding)
            self._keep = keep
            return torch.from_numpy(logits), past
        binding = session.io_binding()
        for name, arr in inputs:
            binding.bind_cpu_input(name, arr)
        for c, t in zip(self.cache_layout, past):
            if isinstance(t, ort.OrtValue):
                binding.bind_ortvalue_input(c.input_name, t)
            else:
                arr = np.ascontiguousarray(t.numpy() if isinstance(t, torch.Tensor) else t)
                keep.append(arr)
                binding.bind_cpu_input(c.input_name, arr)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return torch.from_numpy(outs[0].numpy()), outs[1:]

    def _logits_array(self, session, batch: int, steps: int) -> np.ndarray:
        """An empty array for the logits of one run of `session`: [batch, steps, vocab], or [batch, 1, vocab] for the
        last-position graph."""
        if id(session) not in self._logits_layout:
            out = session.get_outputs()[0]
            _, seq, vocab = out.shape
            self._logits_layout[id(session)] = (seq, vocab, {"tensor(float)": np.float32,
                                                             "tensor(float16)": np.float16}[out.type])
        seq, vocab, dtype = self._logits_layout[id(session)]
        return np.empty((batch, seq if isinstance(seq, int) else steps, vocab), dtype=dtype)

    def _bind_cache(self, binding, buffers) -> None:
        """Bind each cache buffer as both its past input and its present output."""
        for c, buffer in zip(self.cache_layout, buffers):
            binding.bind_ortvalue_input(c.input_name, buffer)
            binding.bind_ortvalue_output(c.output_name, buffer)

    def _buffers(self, past, total: int, steps: int, capacity: int | None = None) -> list:
        """The cache as buffers that hold `total` positions: `past` itself when its tensors are such OrtValues,
        else new buffers of `capacity` positions with the first total - steps positions of `past` copied in.
        By default a new buffer has room for a quarter more (at least 64 positions), so a decode reallocates
        rarely; the positions past the valid ones are never read (the graph takes the valid length from the
        mask)."""
        import onnxruntime as ort

        if all(isinstance(t, ort.OrtValue) and _length(t) >= total for t in past):
            return list(past)
        keep = total - steps
        capacity = max(capacity or total + max(64, total // 4), total)
        buffers = []
        for t in past:
            old = t.numpy() if isinstance(t, (ort.OrtValue, torch.Tensor)) else np.asarray(t)
            if old.shape[2] < keep:
                raise ValueError(f"the cache holds {old.shape[2]} positions, the mask says {keep}")
            new = np.empty((*old.shape[:2], capacity, *old.shape[3:]), dtype=old.dtype)
            new[:, :, :keep] = old[:, :, :keep]
            # the rest written now, so that its pages are mapped before the prompt runs: np.zeros' pages would be
            # faulted in by the decode steps, a few each step (SmolLM2 FP32 at batch 8: 94 MB, 23,000 faults)
            new[:, :, keep:] = 0
            buffers.append(ort.OrtValue.ortvalue_from_numpy(new))
        return buffers

    def _run_rows(self, session, input_ids, attention_mask, position_ids, past):
        """`_run` of each batch row on its own, the results stacked (copies; for the steps GroupQueryAttention
        takes at batch 1 only)."""
        import onnxruntime as ort

        past = [t.numpy() if isinstance(t, (ort.OrtValue, torch.Tensor)) else np.asarray(t) for t in past]
        rows = [self._run(session, input_ids[b:b + 1], attention_mask[b:b + 1], position_ids[b:b + 1],
                          [t[b:b + 1] for t in past]) for b in range(input_ids.shape[0])]
        logits = torch.cat([r[0] for r in rows])
        present = [ort.OrtValue.ortvalue_from_numpy(np.concatenate([r[1][i].numpy() for r in rows]))
                   for i in range(len(past))]
        return logits, present

    def report(self) -> dict:
        """History, cache layout, ONNX op histogram and initializer sizes by dtype and file size."""
        import collections

        import onnx

        model = onnx.load(os.path.join(self.folder, self.manifest.get("model_file", "model.onnx")),
                          load_external_data=False)
        ops = collections.Counter(f"{n.domain or 'ai.onnx'}.{n.op_type}" for n in model.graph.node)
        comps: dict = collections.defaultdict(lambda: {"bytes": 0, "numel": 0, "tensors": 0})
        for init in model.graph.initializer:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            numel = int(np.prod(init.dims)) if init.dims else 1
            c = comps[f"initializers {dtype}"]
            c["numel"] += numel
            c["bytes"] += numel * dtype.itemsize
            c["tensors"] += 1
        for c in comps.values():
            c["bits_per_element"] = round(8 * c["bytes"] / max(c["numel"], 1), 4)
        files = {f: os.path.getsize(os.path.join(self.folder, f)) for f in sorted(os.listdir(self.folder))}
        return {"name": self.manifest.get("name", "model"), "source": self.manifest.get("source", ""),
                "backend": "onnxruntime", "architecture": json.load(open(os.path.join(self.folder, "config.json")))
                .get("model_type", "?"), "layers": max(c.layer for c in self.cache_layout) + 1,
                "history": self.manifest.get("history", []), "cache_layout": self.manifest["cache_layout"],
                "ops": dict(ops.most_common()), "parity": self.manifest.get("parity"),
                "size": {"components": dict(comps), "total_bytes": sum(c["bytes"] for c in comps.values()),
                         "files": files, "tied": []}}
