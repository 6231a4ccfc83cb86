"""The IR: a Program is a traced decode-step graph plus everything needed to run, rewrite and save it."""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx

from llmc.graph import get_attr_tensor, strip_runtime_noops
from llmc.trace import CacheTensor, dynamic_shapes, empty_cache


@dataclass
class PassRecord:
    """One entry of a Program's history: which pass ran, with what config, what it did, how long."""

    name: str
    spec: str
    config: dict
    stats: dict
    seconds: float

    def to_json(self) -> dict:
        return {"name": self.name, "spec": self.spec, "config": self.config, "stats": self.stats,
                "seconds": round(self.seconds, 3)}


# Component of a state tensor, from its FQN and what reads it. Order matters: first match wins.
def _component(fqn: str, linear_modules: set[str]) -> str:
    module, _, leaf = fqn.rpartition(".")
    if module.endswith("embed_tokens"):
        return "embeddings"
    if module == "lm_head" or module.endswith(".lm_head"):
        return "lm_head"
    if module.rpartition(".")[2] in ("cq_key", "cq_value", "uniform_key"):
        return "kv cache codebooks/ranges"
    if leaf in ("codebooks", "codebook"):
        return "codebooks"
    if leaf == "codes":
        return "codes"
    if leaf in ("scales", "scale", "zero_points", "zeros"):
        return "scales"
    if module in linear_modules:
        return "linear weights" if leaf == "weight" else "linear biases" if leaf == "bias" else "linear other"
    if "norm" in module.rpartition(".")[2]:
        return "norms"
    return "other"


@dataclass
class Program:
    """A traced decode step (FX GraphModule) with its model config, cache layout, tokenizer and history.

    `gm` has the signature `(input_ids, attention_mask, position_ids, past) -> (logits, present)`;
    `cache_layout` says what each past/present tensor is. Passes rewrite `gm` in place.
    """

    gm: fx.GraphModule
    config: object  # transformers PretrainedConfig
    cache_layout: list[CacheTensor]
    tokenizer: object = None
    name: str = "model"
    history: list[PassRecord] = field(default_factory=list)
    # FQN -> (out_features, in_features) of every linear layer at trace time, for bits/parameter.
    linear_shapes: dict = field(default_factory=dict)
    source: str = ""
    eos_ids: tuple = ()  # token ids that end generation (the model's generation config)

    @classmethod
    def from_traced(cls, traced, config, tokenizer=None, name="model", source="", eos_ids=()) -> "Program":
        gm = traced.exported.module()
        strip_runtime_noops(gm)
        return cls(gm, config, traced.cache_layout, tokenizer, name, [], linear_weight_shapes(gm), source,
                   tuple(eos_ids))

    def fork(self) -> "Program":
        """A Program with its own copy of the graph and history that shares this one's tensors: passes run
        on the fork replace tensors (they never mutate one in place), so this Program is left as it is.
        Trace once, fork per pipeline."""
        with warnings.catch_warnings():  # pytree's deprecation notice, raised while copying node metadata
            warnings.simplefilter("ignore", FutureWarning)
            gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        # GraphModule copies every tensor the graph reads as a persistent buffer; keep non-persistent ones
        # (rotary inv_freq) out of the state dict as they were, so the fork has the same digest
        persistent = set(self.gm.state_dict(keep_vars=True))
        for name in gm.state_dict(keep_vars=True):
            if name not in persistent:
                owner, _, leaf = name.rpartition(".")
                (gm.get_submodule(owner) if owner else gm)._non_persistent_buffers_set.add(leaf)
        return dataclasses.replace(self, gm=gm, history=list(self.history), linear_shapes=dict(self.linear_shapes),
                                   cache_layout=list(self.cache_layout))

    @property
    def num_layers(self) -> int:
        return max(c.layer for c in self.cache_layout) + 1

    def linear_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]

    def exported(self, gm: torch.fx.GraphModule | None = None) -> torch.export.ExportedProgram:
        """Re-export the (rewritten) graph, or `gm` (a variant of it with the same signature), to a fresh
        ExportedProgram with the same dynamic dims."""
        example = self.example_inputs()
        with torch.no_grad():
            return torch.export.export(self.gm if gm is None else gm, example,
                                       dynamic_shapes=dynamic_shapes(self.cache_layout), strict=False)

    def example_inputs(self, batch: int = 2, seq: int = 3, past_len: int = 4):
        """Sample inputs matching the cache layout (every dynamic dim >= 2)."""
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        pos = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
        return ids, mask, pos, self.empty_cache(batch, past_len)

    def empty_cache(self, batch: int, past_len: int = 0) -> list[torch.Tensor]:
        """Cache tensors of `past_len` positions (zeros) in the layout the graph expects."""
        return empty_cache(self.cache_layout, batch, past_len)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the graph by FQN (tied tensors appear under each name)."""
        out = dict(self.gm.named_parameters(remove_duplicate=False))
        out.update(self.gm.named_buffers(remove_duplicate=False))
        return out

    def size_report(self) -> dict:
        """Bytes, element counts and bits per element per component, plus bits per linear weight.

        Tied tensors (lm_head sharing the embedding) are counted once, under the first name.
        `decoder_linear_bits_per_param` divides every stored bit of the decoder's linear layers
        (weights, codes, codebooks, scales, biases) by the weights they had at trace time.
        """
        linear_modules = set(self.linear_shapes)
        comps: dict = collections.defaultdict(lambda: {"bytes": 0, "numel": 0, "tensors": 0})
        seen: dict = {}
        tied: list = []
        linear_bytes = collections.Counter()
        for fqn, t in sorted(self.state_tensors().items()):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                tied.append(f"{fqn} = {seen[key]}")
                continue
            seen[key] = fqn
            comp = _component(fqn, linear_modules)
            nbytes = t.numel() * t.element_size()
            c = comps[comp]
            c["bytes"] += nbytes
            c["numel"] += t.numel()
            c["tensors"] += 1
            module = fqn.rpartition(".")[0]
            while module and module not in linear_modules:
                module = module.rpartition(".")[0]
            if module and module != "lm_head":
                linear_bytes[module] += nbytes
        for c in comps.values():
            c["bits_per_element"] = round(8 * c["bytes"] / max(c["numel"], 1), 4)
        dec = [m for m in self.linear_shapes if m != "lm_head"]
        dec_params = sum(self.linear_shapes[m][0] * self.linear_shapes[m][1] for m in dec)
        dec_bits = 8 * sum(linear_bytes[m] for m in dec)
        total = sum(c["bytes"] for c in comps.values())
        return {
            "components": dict(sorted(comps.items())),
            "total_bytes": total,
            "decoder_linear_params": dec_params,
            "decoder_linear_bits_per_param": round(dec_bits / max(dec_params, 1), 4),
            "tied": tied,
            "kv_cache": self.kv_cache_report(comps.get("kv cache codebooks/ranges", {}).get("bytes", 0)),
        }

    def kv_cache_report(self, table_bytes: int = 0) -> dict:
        """What the KV cache costs, every layer, keys and values together.

        bits_per_channel / bytes_per_token: as a real cache of its representation stores it
        (`CacheTensor.cost`: packed codes, scales and zero points; a simulated quantization counted
        as the codes it simulates). stored_bytes_per_token: what llmc's runtime holds (the tensors'
        dtypes). fixed_bytes: what does not grow with the context (float windows at batch 1,
        codebooks and ranges).
        """
        bits = stored = channels = 0.0
        fixed = table_bytes
        for c in self.cache_layout:
            size = torch.empty((), dtype=getattr(torch, c.dtype)).element_size()
            if "past_sequence_length" in c.shape:
                ch, bpc = c.cost()
                bits += c.shape[1] * ch * bpc
                stored += c.shape[1] * c.shape[3] * size
                channels += c.shape[1] * ch
            else:  # a fixed-length float window or sink
                fixed += c.shape[1] * c.shape[2] * c.shape[3] * size
        return {"bits_per_channel": round(bits / max(channels, 1), 4), "bytes_per_token": round(bits / 8, 2),
                "stored_bytes_per_token": int(stored), "fixed_bytes": int(fixed)}


def linear_weight_shapes(gm: fx.GraphModule) -> dict:
    """FQN of each module read by an `aten.linear` -> (out_features, in_features) of its weight."""
    shapes = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            w = n.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                shapes[w.target.rpartition(".")[0]] = tuple(get_attr_tensor(gm, w).shape)
    return shapes
