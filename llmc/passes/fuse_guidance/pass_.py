"""fuse_guidance: a small tuned / untuned model pair as one graph that guides a large model.

Weak-to-strong search (Zhou et al., arXiv 2405.19262, §3) steers a frozen base model with the
log-likelihood ratio of a small tuned model over its untuned version, s(y) = Σ log π_tuned(y_t) −
Σ log π_untuned(y_t) over the response tokens: the implicit reward of KL-constrained RL, dense
over tokens. This module builds the graphs that evaluate it:

- `fuse_scorer(tuned, untuned)`: one decode-step Program that runs both models side by side on
  one input, each with its own KV cache. Its signature is every Program's,
  `(input_ids, attention_mask, position_ids, past) -> (logits, present)`, with `logits` [B, S, 1]
  the running sum over the step's positions j of mask_j·mask_{j-1}·(log π_tuned(x_j | x_<j) − log
  π_untuned(x_j | x_<j)); the first position is not scored (its context is not in the step). So
  the last position is the per-sequence Σ over the step's tokens, and scoring a new chunk costs
  the chunk, not the prefix: `llmc.search.GuideScorer` feeds it incrementally.
- `fuse_eft(base, tuned, untuned, beta)`: the token-level variant (EFT) as one step of the three
  models, logits = log_softmax(base) + β·(log_softmax(tuned) − log_softmax(untuned)), for models
  with one vocabulary; it samples like any model.

Both copy the source graphs node for node into one FX graph (custom ops of compressed models
included), renumber the second model's layers after the first's (cache I/O
`past_key_values.{i}.*` and the per-layer split of the torch runtime stay unique), and append a
small exported tail. The result lowers to ONNX like any Program.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx, nn

from llmc.errors import ConfigError
from llmc.graph import strip_runtime_noops
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.program import Program, linear_weight_shapes
from llmc.search import same_vocabulary
from llmc.trace import CacheTensor, dynamic_shapes

_LAYER = re.compile(r"(^|\.)layers\.(\d+)")


def as_program(model) -> Program:
    """A Program from anything `llmc.compile` accepts, or a compiled model (object or folder)."""
    from llmc.api import to_program

    if isinstance(model, Program):
        return model
    program = getattr(model, "program", None)
    if isinstance(program, Program):  # a CompiledModel
        return program
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        from llmc.compiled import MANIFEST, load

        if os.path.isfile(os.path.join(model, MANIFEST)):
            return load(str(model)).program
        if any(f.endswith(".onnx") for f in os.listdir(model)):
            raise ConfigError(f"{model} is an ONNX folder: fuse_guidance needs the model's graph; give the Hugging "
                              "Face folder or the torch-compiled folder of the model instead")
    if hasattr(model, "step") and not isinstance(model, nn.Module):
        raise ConfigError(f"cannot fuse a {type(model).__name__}: give a CompiledModel, a Program, a compiled folder "
                          "or anything llmc.compile accepts")
    return to_program(model)


class _ScoreTail(nn.Module):
    """Running Σ of mask·(log π_tuned − log π_untuned) of each step token given the tokens before it."""

    def forward(self, input_ids, attention_mask, tuned_logits, untuned_logits):
        S, T = input_ids.shape[1], attention_mask.shape[1]
        # Written with rolls rather than [:, 1:] slices, which make torch.export guard S != 2.
        nxt = input_ids.roll(-1, 1).unsqueeze(-1)  # position j predicts token j+1 (the last wraps; dropped below)
        lt = tuned_logits.float().log_softmax(-1).gather(-1, nxt).squeeze(-1)  # [B, S]
        lu = untuned_logits.float().log_softmax(-1).gather(-1, nxt).squeeze(-1)
        # The step's real tokens (padding, finished rows: 0), gathered by index so that export ties no shapes.
        weight = attention_mask.index_select(1, torch.arange(S, device=lt.device) + (T - S)).to(lt.dtype)
        # step[j] scores token j from position j-1; a token counts when it and the one before it are real
        # (the first real token of a left-padded row has no context in the row).
        step = (lt - lu).roll(1, 1) * weight * weight.roll(1, 1)
        step = step * (torch.arange(S, device=step.device) > 0).to(step.dtype)  # token 0's context is not here
        return step.cumsum(1).unsqueeze(-1)  # [B, S, 1]


class _EFTTail(nn.Module):
    """log_softmax(base) + β·(log_softmax(tuned) − log_softmax(untuned)) (Mitchell et al.'s EFT, §3.2)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def forward(self, base_logits, tuned_logits, untuned_logits):
        guide = tuned_logits.float().log_softmax(-1) - untuned_logits.float().log_softmax(-1)
        return base_logits.float().log_softmax(-1) + self.beta * guide


def _tail_module(tail: nn.Module, example: tuple, dims: tuple) -> fx.GraphModule:
    with torch.no_grad():
        ep = torch.export.export(tail, example, dynamic_shapes=dims, strict=False)
    gm = ep.module()
    strip_runtime_noops(gm)
    return gm


def _copy_meta_stack(node: fx.Node, prefix: str, layer_offset: int) -> None:
    """Prefix the node's module FQNs and shift its layer numbers (a new dict: node_copy shares the old)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return
    renamed = {}
    for key, (fqn, cls) in stack.items():
        if fqn and not fqn.startswith("_empty"):
            fqn = prefix + "." + _LAYER.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + layer_offset}", fqn)
        renamed[prefix + "." + key] = (fqn, cls)
    node.meta["nn_module_stack"] = renamed


def _fuse(parts: list[tuple[str, Program]], tail: nn.Module, tail_inputs, tail_example, tail_dims) -> tuple:
    """One GraphModule running `parts` (prefix, Program) side by side on the same input, then `tail`.

    `tail_inputs(ids, mask, logits)` picks the tail's inputs from the graph's nodes. Returns the
    GraphModule and the combined cache layout (layers renumbered in part order).
    """
    root = nn.Module()
    graph = fx.Graph()
    ids, mask, pos = (graph.placeholder(n) for n in ("input_ids", "attention_mask", "position_ids"))
    layout: list[CacheTensor] = []
    past_nodes: list[fx.Node] = []
    offsets = []
    for prefix, program in parts:
        offset = (max(c.layer for c in layout) + 1) if layout else 0
        offsets.append(offset)
        for c in program.cache_layout:
            layout.append(CacheTensor(c.layer + offset, c.kind, c.dtype, c.shape, f"{prefix}: {c.meaning}",
                                      c.channels, c.bits_per_channel))
    for i in range(len(layout)):
        past_nodes.append(graph.placeholder(f"past_{i}"))
    logits, present, start = [], [], 0
    for (prefix, program), offset in zip(parts, offsets):
        root.add_module(prefix, program.gm)
        src = program.gm.graph
        holders = [n for n in src.nodes if n.op == "placeholder"]
        n_cache = len(program.cache_layout)
        if len(holders) != 3 + n_cache:
            raise ConfigError(f"the {prefix} graph has {len(holders)} inputs, expected input_ids, attention_mask, "
                              f"position_ids and {n_cache} cache tensors: is it a decode-step Program?")
        val_map = dict(zip(holders, [ids, mask, pos, *past_nodes[start:start + n_cache]]))
        start += n_cache
        out = graph.graph_copy(src, val_map)
        for old, new in val_map.items():
            if old.op in ("get_attr", "call_module"):  # weights; export's input-guard module
                new.target = f"{prefix}.{old.target}"
            if old.op != "placeholder":
                _copy_meta_stack(new, prefix, offset)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        logits.append(out[0])
        present.extend(out[1:])
    tail_gm = _tail_module(tail, tail_example, tail_dims)
    root.add_module("tail", tail_gm)
    holders = [n for n in tail_gm.graph.nodes if n.op == "placeholder"]
    val_map = dict(zip(holders, tail_inputs(ids, mask, logits)))
    tail_out = graph.graph_copy(tail_gm.graph, val_map)
    for old, new in val_map.items():
        if old.op in ("get_attr", "call_module"):
            new.target = f"tail.{old.target}"
    tail_out = tail_out[0] if isinstance(tail_out, (tuple, list)) else tail_out
    graph.output((tail_out, *present))
    # The Program signature: (input_ids, attention_mask, position_ids, past: list) -> (logits, present: list).
    ex = (torch.zeros(1, 1, dtype=torch.long),) * 3
    in_spec = torch.utils._pytree.tree_flatten(((*ex, [torch.zeros(1)] * len(layout)), {}))[1]
    out_spec = torch.utils._pytree.tree_flatten((torch.zeros(1), [torch.zeros(1)] * len(layout)))[1]
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
        ["input_ids", "attention_mask", "position_ids", "past"], in_spec, out_spec))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    strip_runtime_noops(gm)
    return gm, layout


def _check_batch_major(program: Program, role: str) -> None:
    bad = [c.input_name for c in program.cache_layout if c.shape[0] != "batch"]
    if bad:
        raise ConfigError(f"the {role} model's cache tensors {', '.join(bad[:3])} are not batch-major; "
                          "fuse_guidance needs every cache tensor to be [batch, ...]")


def _scorer_parts(tuned: Program, untuned: Program) -> list:
    if not same_vocabulary(tuned.tokenizer, untuned.tokenizer) or tuned.config.vocab_size != untuned.config.vocab_size:
        raise ConfigError("the tuned and untuned models have different tokenizers: a guide pair shares one "
                          "vocabulary (the untuned model is the tuned one before tuning)")
    for program, role in ((tuned, "tuned"), (untuned, "untuned")):
        _check_batch_major(program, role)
        window = [c.input_name for c in program.cache_layout if "past_sequence_length" not in c.shape]
        if window:
            raise ConfigError(f"the {role} model has fixed-length cache tensors ({', '.join(window[:3])}); the "
                              "incremental scorer drops cache positions and needs caches that grow with the text")
    return [("tuned", tuned), ("untuned", untuned)]


def _score_graph(tuned: Program, untuned: Program) -> tuple:
    vocab = tuned.config.vocab_size
    Dim = torch.export.Dim
    b, s, t = Dim("batch", min=1, max=4096), Dim("sequence_length", min=1, max=65536), Dim("total", min=1, max=196608)
    example = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
               torch.zeros(2, 3, vocab), torch.zeros(2, 3, vocab))
    dims = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, {0: b, 1: s})
    return _fuse(_scorer_parts(tuned, untuned), _ScoreTail(),
                 lambda ids, mask, logits: [ids, mask, logits[0], logits[1]], example, dims)


def fuse_scorer(tuned, untuned) -> Program:
    """The guide scorer of a tuned / untuned pair as one Program (see the module docstring).

    `tuned`, `untuned`: CompiledModels, Programs, compiled folders or anything `llmc.compile`
    accepts. Both must share one tokenizer. The Program's tokenizer, config and EOS are the tuned model's.
    """
    t, u = as_program(tuned), as_program(untuned)
    gm, layout = _score_graph(t, u)
    return Program(gm, t.config, layout, t.tokenizer, f"guidance({t.name}, {u.name})", list(t.history),
                   linear_weight_shapes(gm), t.source, t.eos_ids)


def _eft_graph(base: Program, tuned: Program, untuned: Program, beta: float) -> tuple:
    for p, role in ((tuned, "tuned"), (untuned, "untuned")):
        if not same_vocabulary(base.tokenizer, p.tokenizer) or base.config.vocab_size != p.config.vocab_size:
            raise ConfigError(f"EFT adds logits token by token, so the base and the {role} model need one "
                              "vocabulary; with different tokenizers use the chunk-level search "
                              "(llmc.search with a scorer from fuse_scorer), which goes through text")
        _check_batch_major(p, role)
    _check_batch_major(base, "base")
    vocab = base.config.vocab_size
    Dim = torch.export.Dim
    b, s = Dim("batch", min=1, max=4096), Dim("sequence_length", min=1, max=65536)
    example = tuple(torch.zeros(2, 3, vocab) for _ in range(3))
    dims = tuple({0: b, 1: s} for _ in range(3))
    return _fuse([("base", base), ("tuned", tuned), ("untuned", untuned)], _EFTTail(beta),
                 lambda ids, mask, logits: logits, example, dims)


def fuse_eft(base, tuned, untuned, beta: float = 1.0) -> Program:
    """One decode step of base + β·(tuned − untuned) in log-probabilities (EFT), as a Program that
    generates like the base model. All three models must share one vocabulary."""
    b, t, u = as_program(base), as_program(tuned), as_program(untuned)
    gm, layout = _eft_graph(b, t, u, beta)
    return Program(gm, b.config, layout, b.tokenizer, f"eft({b.name}, {t.name}, {u.name}, beta={beta:g})",
                   list(b.history), linear_weight_shapes(gm), b.source, b.eos_ids)


@register_pass("fuse_guidance")
@dataclass(frozen=True)
class FuseGuidance(Pass):
    """Fuse the compiled model with guide models into one graph (weak-to-strong search, Zhou et al. §3).

    mode=score: the compiled model is the *tuned* guide; `untuned` names its untuned version. The
    result is the scorer Program (logits = running Σ log π_tuned − log π_untuned, [B, S, 1]) that
    `llmc.search` uses. mode=eft: the compiled model is the *base*; `tuned` and `untuned` name the
    guides; the result samples from log π_base + β·(log π_tuned − log π_untuned).
    Models are named by anything `llmc.compile` accepts or a compiled folder.
    Matches: the whole graph. Emits: copies of the guides' graphs and a score tail. Numerics: exact.
    """

    untuned: str = ""
    mode: Literal["score", "eft"] = "score"
    tuned: str = ""
    beta: float = 1.0

    provides = ("guidance_fused",)
    # The fused graph is not a single decoder any more: passes that rewrite one decoder do not apply.
    invalidates = ("dense_linear_weights", "float_kv_cache")

    def __post_init__(self):
        if self.mode not in ("score", "eft"):
            raise ConfigError(f"fuse_guidance.mode must be 'score' or 'eft', got {self.mode!r}")
        if not self.untuned:
            raise ConfigError("fuse_guidance needs untuned=MODEL (the guide before tuning)")
        if self.mode == "score" and self.tuned:
            raise ConfigError("fuse_guidance:mode=score fuses the compiled model (the tuned guide) with `untuned`; "
                              "drop tuned=..., or use mode=eft to fuse a base model with both guides")
        if self.mode == "eft" and not self.tuned:
            raise ConfigError("fuse_guidance:mode=eft needs tuned=MODEL and untuned=MODEL (the compiled model is the base)")
        if not isinstance(self.beta, (int, float)) or not self.beta == self.beta:
            raise ConfigError(f"fuse_guidance.beta must be a number, got {self.beta!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.program is None:
            raise ConfigError("fuse_guidance needs the Program in the pass context; run it through llmc.compile")
        this = ctx.program
        if self.mode == "score":
            fused, layout = _score_graph(this, as_program(self.untuned))
            stats = {"mode": "score", "guide_layers": [this.num_layers, max(c.layer for c in layout) + 1 - this.num_layers]}
        else:
            fused, layout = _eft_graph(this, as_program(self.tuned), as_program(self.untuned), self.beta)
            stats = {"mode": "eft", "beta": self.beta}
        stats["cache_tensors"] = len(layout)
        return PassResult(fused, True, stats, cache_layout=layout)
