"""structured_ffn: replace FFN linears with low-rank / block-dense / block-shuffle factors.

Wei et al., "Building on Efficient Foundations" (NeurIPS 2024) train structured FFNs from
scratch; this pass converts a trained model. Each FFN linear (gate/up/down, or phi3's fused
gate_up) becomes a structured map with at most `budget` of its parameters
(`structured_ffn_factors`), initialised from the trained weight by truncated SVD, by the
activation-aware (whitened) SVD on the FP model's calibration inputs (`init=aware`), or layer by
layer (`init=layerwise`, `structured_ffn_local`): the whitened SVD on the inputs the
already-structured layers before it produce, then `local_epochs` of Adam on the layer's factors
against the FP model's hidden state after that layer. Optional recovery trains the factors by
self-guided distillation (`structured_ffn_recovery`): during training every rewritten linear
computes lerp(structured, dense, α) with α decaying 1 -> 0, and the dense branch is removed from
the graph afterwards. Finally each structured linear is timed against its merged dense matrix at
decode size (one token) and the faster form stays in the graph (§4.5, "pre-merge").

Gate and up read the same input; with `fuse_gate_up` they are factorised as one [2f, d] matrix
(shared input factor, as in the reference repository) and the two halves are sliced out.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from llmc.calibration import fingerprint, graph_teacher, relative_output_error, stream_grams
from llmc.errors import ConfigError, PassError
from llmc.fsutil import tensor_digest
from llmc.graph import attr_tensor, get_attr_tensor, graph_digest, module_fqn, remove_unused_attrs, set_attr_tensor
from llmc.passes.structured_ffn.factors import KINDS, Shape, factorize, merged_weight, plan, structured_linear
from llmc.passes.structured_ffn.local import LocalPlan, LocalUnit, local_init
from llmc.passes.structured_ffn.recovery import RecoveryPlan, self_guided_distill
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import bar
from llmc.rewrite import check_targets

logger = logging.getLogger(__name__)
aten = torch.ops.aten
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ALPHA = "structured_ffn_alpha"


@dataclass
class _Unit:
    """One structured linear to emit: the linear nodes it replaces (two when gate/up are fused)."""

    module: str              # where its tensors live, e.g. model.layers.3.mlp.down_proj
    nodes: list              # the aten.linear nodes, in output order
    weight: torch.Tensor     # [M, N] (gate and up stacked when fused)
    x: fx.Node | None = None          # their common input
    shape: Shape | None = None
    first: torch.Tensor | None = None
    second: torch.Tensor | None = None
    out: fx.Node | None = None        # the structured branch's output node
    emitted: list | None = None       # every node of the structured branch, in order
    choice: str = "factored"


@register_pass("structured_ffn")
@dataclass(frozen=True)
class StructuredFFN(Pass):
    """Rewrite FFN linears into structured factors (LowRank, BlockDense, BlockShuffle).

    Matches: `aten.linear` with a stored weight in a module whose FQN matches `targets`, except the
    first layer's with `skip_first`. Emits: `aten.linear` pairs (lowrank), or unflatten / transpose /
    matmul / flatten + `aten.linear` (blockdense), or two block matmuls around a stride permutation
    (blockshuffle); a plain `aten.linear` with the merged weight where that is faster at decode.
    Numerics: lossy (exact when the weights already have the structure).
    """

    kind: Literal["lowrank", "blockdense", "blockshuffle"] = "lowrank"
    budget: float = 0.63
    init: Literal["svd", "aware", "layerwise"] = "layerwise"
    blocks: int = 2
    skip_first: bool = True
    fuse_gate_up: bool = True
    targets: str = r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj|gate_up_proj)$"
    damp: float = 0.01
    local_epochs: int = 2
    local_lr: float = 1e-4
    steps: int = 0
    lr: float = 1e-4
    guided_fraction: float = 0.5
    batch_size: int = 1
    train_guide: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int = 25
    premerge: Literal["auto", "never", "always"] = "auto"
    premerge_repeats: int = 200

    requires = ("dense_linear_weights",)
    invalidates = ("dense_linear_weights",)
    provides = ("structured_ffn",)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"structured_ffn.kind must be one of {', '.join(KINDS)}, got '{self.kind}'")
        if not 0 < self.budget <= 1:
            raise ConfigError(f"structured_ffn.budget is the fraction of FFN parameters kept and must be in (0, 1], "
                              f"got {self.budget}")
        if self.init not in ("svd", "aware", "layerwise"):
            raise ConfigError(f"structured_ffn.init must be svd, aware or layerwise, got '{self.init}'")
        if self.premerge not in ("auto", "never", "always"):
            raise ConfigError(f"structured_ffn.premerge must be auto, never or always, got '{self.premerge}'")
        for name, low in (("blocks", 1), ("steps", 0), ("local_epochs", 0), ("batch_size", 1),
                          ("checkpoint_every", 1), ("premerge_repeats", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"structured_ffn.{name} must be >= {low}, got {getattr(self, name)}")
        if not 0 <= self.guided_fraction <= 1:
            raise ConfigError(f"structured_ffn.guided_fraction must be in [0, 1], got {self.guided_fraction}")
        if self.lr <= 0 or self.local_lr <= 0 or self.damp < 0:
            raise ConfigError(f"structured_ffn.lr and local_lr must be > 0 and damp >= 0, got lr={self.lr}, "
                              f"local_lr={self.local_lr}, damp={self.damp}")
        check_targets("structured_ffn", self.targets)

    # -- matching ----------------------------------------------------------------------------
    def _units(self, gm: fx.GraphModule) -> tuple[list[_Unit], dict]:
        pattern = re.compile(self.targets)
        skipped: dict = {}
        linears = []
        for n in gm.graph.nodes:
            if n.op != "call_function" or n.target is not aten.linear.default:
                continue
            fqn = module_fqn(n)
            if not pattern.search(fqn):
                continue
            w = n.args[1]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                skipped[fqn] = "weight is not a stored tensor"
            elif len(n.args) > 2 and n.args[2] is not None:
                skipped[fqn] = "has a bias"
            elif self.skip_first and (m := _LAYER.search(fqn)) and int(m.group(1)) == 0:
                skipped[fqn] = "first layer (skip_first)"
            else:
                linears.append(n)
        for fqn, why in skipped.items():
            logger.debug("structured_ffn: %s left dense: %s", fqn, why)
        units, used = [], set()
        by_name = {module_fqn(n): n for n in linears}
        for n in linears:
            if n in used:
                continue
            fqn = module_fqn(n)
            parent, _, leaf = fqn.rpartition(".")
            partner = by_name.get(f"{parent}.up_proj") if leaf == "gate_proj" else None
            if self.fuse_gate_up and partner is not None and partner.args[0] is n.args[0] and partner not in used:
                w = torch.cat([get_attr_tensor(gm, n.args[1]), get_attr_tensor(gm, partner.args[1])])
                units.append(_Unit(f"{parent}.gate_up", [n, partner], w.detach()))
                used.update((n, partner))
            else:
                units.append(_Unit(fqn, [n], get_attr_tensor(gm, n.args[1]).detach()))
                used.add(n)
        return units, skipped

    # -- the pass ----------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        units, skipped = self._units(gm)
        if not units:
            logger.debug("structured_ffn: no FFN linear matches %r", self.targets)
            return PassResult(gm, False, {"replaced": 0, "skipped": skipped})
        for u in units:
            M, N = u.weight.shape
            try:
                u.shape = plan(self.kind, M, N, self.budget, self.blocks)
            except ConfigError as e:
                raise ConfigError(f"{e} ({u.module})") from None
        needs_data = self.init != "svd" or self.steps > 0
        if needs_data and not ctx.calibration:
            raise ConfigError(f"structured_ffn with init={self.init}, steps={self.steps} needs calibration data: "
                              "pass compile(..., calibration='wikitext2-valid') or --calib")
        if needs_data and ctx.program is None:
            raise ConfigError("structured_ffn needs the Program (its cache layout) in the PassContext; "
                              "run it through llmc.compile or a PassManager")
        seconds = {}
        model_digest = data_digest = ""
        if ctx.calibration and ctx.program is not None:
            model_digest = graph_digest(gm)
            data_digest = tensor_digest(ctx.calibration)

        # 1. initialisation: activation-aware (XᵀX of each unit's input, streamed over the data), or
        #    layer by layer on the already-structured model's states with local fine-tuning
        if self.init == "layerwise":
            errors = self._layerwise_init(gm, units, ctx, model_digest, data_digest, seconds)
        else:
            errors = self._aware_init(gm, units, ctx, model_digest, data_digest, seconds)

        # 2. rewrite: structured branch per unit (+ a dense guide blended by α while recovering); the
        #    recovery's teacher, when the context brings none, is the graph as it is before the rewrite
        teacher = ctx.teacher
        if self.steps > 0 and teacher is None:
            teacher = graph_teacher(gm, ctx.program.empty_cache)
        guides = self._rewrite(gm, units, guided=self.steps > 0)
        recovery = None
        if self.steps > 0:
            recovery = self._recover(gm, units, guides, teacher, ctx, model_digest, data_digest, seconds)

        # 3. pre-merge: keep whichever form is faster for one token
        t3 = time.perf_counter()
        timings = self._premerge(gm, units, ctx.progress)
        seconds["premerge"] = round(time.perf_counter() - t3, 1)
        remove_unused_attrs(gm)
        gm.recompile()

        dense = sum(u.weight.numel() for u in units)
        kept = sum(u.shape.params if u.choice == "factored" else u.weight.numel() for u in units)
        stats = {
            "replaced": sum(len(u.nodes) for u in units), "units": len(units),
            "dense_params": dense, "structured_params": sum(u.shape.params for u in units),
            "stored_params": kept, "fraction": round(sum(u.shape.params for u in units) / dense, 4),
            "shapes": {u.module: u.shape.to_json() for u in units},
            "init_output_error": errors,
            "premerge": {u.module: u.choice for u in units}, "premerge_us": timings,
            "merged": sum(u.choice == "merged" for u in units),
            "skipped": skipped, "seconds": seconds,
        }
        if errors:
            stats["init_output_error_mean"] = round(sum(errors.values()) / len(errors), 5)
        if recovery is not None:
            stats["recovery"] = recovery
        return PassResult(gm, True, stats)

    def _recover(self, gm, units: list[_Unit], guides, teacher, ctx: PassContext, model_digest: str,
                 data_digest: str, seconds: dict) -> dict:
        """Self-guided recovery of the factors (recovery.py), then the dense guides leave the graph."""
        t0 = time.perf_counter()
        params = {}
        for u in units:
            for leaf in ("factor_in", "factor_out") + (("guide_weight",) if self.train_guide else ()):
                params[f"{u.module}.{leaf}"] = attr_tensor(gm, f"{u.module}.{leaf}")
        rplan = RecoveryPlan(self.steps, self.lr, self.guided_fraction, self.batch_size, self.checkpoint_every,
                             ctx.seed)
        path, fp = None, ""
        if self.checkpoint_dir:
            config = {k: v for k, v in self.config_dict().items()
                      if k not in ("checkpoint_dir", "checkpoint_every", "premerge", "premerge_repeats")}
            fp = fingerprint(dict(config, seed=ctx.seed), model_digest, data_digest)
            path = os.path.join(self.checkpoint_dir, f"recovery-{fp}.pt")
        recovery = self_guided_distill(gm, params, attr_tensor(gm, ALPHA), teacher, ctx.calibration,
                                       ctx.program.empty_cache, rplan, ctx.progress, path, fp)
        self._drop_guides(gm, units, guides)
        for u in units:
            u.first = attr_tensor(gm, f"{u.module}.factor_in").detach()
            u.second = attr_tensor(gm, f"{u.module}.factor_out").detach()
        seconds["recovery"] = round(time.perf_counter() - t0, 1)
        return recovery

    def _aware_init(self, gm, units: list[_Unit], ctx: PassContext, model_digest: str, data_digest: str,
                    seconds: dict) -> dict:
        """Factors from the FP model's XᵀX (plain SVD with init=svd); returns each unit's output error.

        The statistics are recorded one decoder layer at a time (`stream_grams`) and each layer's
        units are factorized before the next layer's matrices are made."""
        t0 = time.perf_counter()
        parts = [None]  # no statistics: one round over every unit
        if ctx.calibration and ctx.program is not None:  # svd init ignores them but reports its output error
            watch = {u.nodes[0]: u.nodes[0].args[0].name for u in units}
            fp = fingerprint({}, model_digest, data_digest) if self.checkpoint_dir else ""
            parts = stream_grams(gm, watch, ctx.calibration, ctx.program.empty_cache, ctx.progress,
                                 label="structured_ffn", checkpoint_dir=self.checkpoint_dir, fingerprint=fp)
        errors, init_seconds = {}, 0.0
        for grams in parts:
            t1 = time.perf_counter()
            for u in units if grams is None else [u for u in units if u.nodes[0].args[0].name in grams]:
                h = grams.get(u.nodes[0].args[0].name) if grams is not None else None
                u.first, u.second = factorize(u.shape, u.weight, h if self.init == "aware" else None, self.damp)
                if h is not None:
                    errors[u.module] = round(relative_output_error(u.weight, merged_weight(self.kind, u.first, u.second),
                                                                   h), 5)
            init_seconds += time.perf_counter() - t1
        if any(u.first is None for u in units):
            raise PassError("structured_ffn: calibration saw the inputs of only some FFN linears")
        if ctx.calibration and ctx.program is not None:
            seconds["calibration"] = round(time.perf_counter() - t0 - init_seconds, 1)
        seconds["init"] = round(init_seconds, 1)
        return errors

    def _layerwise_init(self, gm, units: list[_Unit], ctx: PassContext, model_digest: str, data_digest: str,
                        seconds: dict) -> dict:
        """Factors fitted layer by layer (`structured_ffn_local`); returns each layer's relative output
        error after its fit."""
        local = [LocalUnit([n.args[1].target for n in u.nodes], u.weight, u.shape) for u in units]
        plan = LocalPlan(self.local_epochs, self.local_lr, self.damp, ctx.seed)
        path, fp = None, ""
        if self.checkpoint_dir:
            config = {k: getattr(self, k) for k in ("kind", "budget", "blocks", "skip_first", "fuse_gate_up",
                                                    "targets", "damp", "local_epochs", "local_lr")}
            fp = fingerprint(dict(config, seed=ctx.seed), model_digest, data_digest)
            path = os.path.join(self.checkpoint_dir, f"layerwise-{fp}.pt")
        t0 = time.perf_counter()
        stats = local_init(gm, self.kind, local, ctx.calibration, ctx.program.empty_cache, plan,
                           ctx.progress, path, fp)
        for u, lu in zip(units, local):
            u.first, u.second = lu.first, lu.second
        seconds["init"] = round(time.perf_counter() - t0, 1)
        return {f"layer {s['layer']}": s["error_after"] for s in stats["layers"]}

    def _rewrite(self, gm: fx.GraphModule, units: list[_Unit], guided: bool) -> dict:
        """Emit each unit's structured branch in place of its linears; returns unit -> lerp node."""
        graph = gm.graph
        guides = {}
        if guided:
            gm.register_buffer(ALPHA, torch.ones(()))
        for u in units:
            anchor = u.nodes[0]
            x = u.x = anchor.args[0]
            meta = dict(anchor.meta.get("nn_module_stack", {}))
            set_attr_tensor(gm, f"{u.module}.factor_in", u.first, parameter=True)
            set_attr_tensor(gm, f"{u.module}.factor_out", u.second, parameter=True)
            emitted = []

            def call(target, *args):
                node = graph.call_function(target, args)
                emitted.append(node)
                return node

            with graph.inserting_before(anchor):
                first = graph.get_attr(f"{u.module}.factor_in")
                second = graph.get_attr(f"{u.module}.factor_out")
                emitted += [first, second]
                out = structured_linear(self.kind, x, first, second, call, tuple(u.first.shape))
                u.out, u.emitted = out, list(emitted)
                y = out
                if guided:
                    set_attr_tensor(gm, f"{u.module}.guide_weight", u.weight.clone(), parameter=True)
                    w = graph.get_attr(f"{u.module}.guide_weight")
                    alpha = graph.get_attr(ALPHA)
                    dense = call(aten.linear.default, x, w)
                    y = call(aten.lerp.Tensor, out, dense, alpha)
                    emitted += [w, alpha]
                    guides[u.module] = y
                outs = self._split(graph, y, u, call)
            for new in emitted:
                new.meta["nn_module_stack"] = dict(meta)
            for node, new in zip(u.nodes, outs):
                new.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(new)
                graph.erase_node(node)
        remove_unused_attrs(gm)
        gm.recompile()
        return guides

    @staticmethod
    def _split(graph: fx.Graph, y: fx.Node, u: _Unit, call) -> list[fx.Node]:
        """The outputs replacing u.nodes: y itself, or its gate and up halves when fused."""
        if len(u.nodes) == 1:
            return [y]
        f = u.weight.shape[0] // 2
        return [call(aten.slice.Tensor, y, -1, 0, f), call(aten.slice.Tensor, y, -1, f, 2 * f)]

    @staticmethod
    def _drop_guides(gm: fx.GraphModule, units: list[_Unit], guides: dict) -> None:
        """Remove the dense branches: each lerp is replaced by its structured input."""
        for u in units:
            lerp = guides[u.module]
            dense = lerp.args[1]
            lerp.replace_all_uses_with(u.out)
            gm.graph.erase_node(lerp)
            gm.graph.erase_node(dense)
        remove_unused_attrs(gm)
        if hasattr(gm, ALPHA):
            delattr(gm, ALPHA)
        gm.recompile()

    def _premerge(self, gm: fx.GraphModule, units: list[_Unit], progress: bool) -> dict:
        """Choose per unit between the factored form and the merged [M, N] matrix; rewrite the merged ones.

        `auto` times both on one token (median of `premerge_repeats` interleaved calls, weights laid
        out in-major as the torch runtime stores them). The cost depends on the shapes only, so
        units of the same shapes share one measurement and one decision (per-layer timings of a
        few microseconds flip with noise). The merged form must win by `PREMERGE_MARGIN` to be
        chosen: within noise the factored form stays, as it is the smaller one.
        """
        timings, by_shape = {}, {}
        for u in bar(units, desc="structured_ffn pre-merge", unit="linear", enabled=progress):
            merged = None  # built only where it is timed or stored
            if self.premerge == "auto":
                key = (tuple(u.first.shape), tuple(u.second.shape))
                if key not in by_shape:
                    merged = merged_weight(self.kind, u.first, u.second)
                    by_shape[key] = _time_forms(self.kind, u.first, u.second, merged, self.premerge_repeats)
                fact_us, merged_us = by_shape[key]
                timings[u.module] = {"factored": round(fact_us, 1), "merged": round(merged_us, 1)}
                u.choice = "merged" if merged_us < (1 - PREMERGE_MARGIN) * fact_us else "factored"
            else:
                u.choice = "merged" if self.premerge == "always" else "factored"
            if u.choice == "merged":
                if merged is None:
                    merged = merged_weight(self.kind, u.first, u.second)
                set_attr_tensor(gm, f"{u.module}.weight", merged, parameter=True)
                with gm.graph.inserting_before(u.out):
                    w = gm.graph.get_attr(f"{u.module}.weight")
                    lin = gm.graph.call_function(aten.linear.default, (u.x, w))
                for new in (w, lin):
                    new.meta["nn_module_stack"] = dict(u.out.meta.get("nn_module_stack", {}))
                lin.meta["val"] = u.out.meta.get("val")
                u.out.replace_all_uses_with(lin)
                for node in reversed(u.emitted):
                    if not node.users:
                        gm.graph.erase_node(node)
                u.out = lin
        return timings


PREMERGE_MARGIN = 0.05  # the merged form must be this much faster (relative) to replace the factored one


def _time_forms(kind: str, first, second, merged, repeats: int) -> tuple[float, float]:
    """Median µs of the factored and the merged forms on one token, interleaved."""
    x = torch.randn(1, 1, merged.shape[1])
    in_major = [t.t().contiguous().t() if t.dim() == 2 else t for t in (first, second, merged)]
    f1, f2, w = in_major
    fns = [lambda: structured_linear(kind, x, f1, f2), lambda: torch.nn.functional.linear(x, w)]
    times = [[], []]
    with torch.inference_mode():
        for fn in fns:
            fn()
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                t = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - t) * 1e6)
    return statistics.median(times[0]), statistics.median(times[1])
