"""Layer-by-layer initialisation of `structured_ffn` factors, with local fine-tuning.

`init=aware` alone fits every FFN linear to the FP model's activations, independently: the down
projection never sees the error of the structured gate/up in front of it, and layer i never sees
the error of layers < i. `local_init` streams the calibration batches through the decoder one
layer at a time (`llmc.calibration.split_blocks`, as GPTQ and AQLM calibrate), so each layer is
fitted to the inputs it will really receive:

  for each layer i, on the hidden states h_i produced by the already-structured layers < i:
    1. XᵀX of each unit's input (the FP layer run on h_i), and the factorisation (`factorize`);
    2. Adam on the layer's factors against a target output, by mean squared error;
    3. h_{i+1} = the structured layer run on h_i.

The target is the FP model's own hidden state after layer i (a second stream of FP states runs
alongside), so a layer also learns to undo what the layers before it lost. The relative output
error is measured before and after training; if training made it worse, the layer keeps its
starting factors. Only factors train; the FP weights in the graph are not touched (the recovery
teacher reads them). Memory: two streams of [batch, seq, hidden] states. Progress is saved after
every layer to `checkpoint_path` (when given), so an interrupted run continues at the next layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from llmc.calibration import (Block, GramRecorder, block_inputs, load_checkpoint, save_checkpoint, split_blocks)
from llmc.calibration.blocks import block_outputs, fit_outputs, relative_error
from llmc.graph import attr_tensor
from llmc.passes.structured_ffn.factors import Shape, factorize, merged_weight
from llmc.progress import bar, log


@dataclass
class LocalUnit:
    """One structured map: the weight targets it replaces (gate and up when fused), stacked in order."""

    targets: list[str]
    weight: Tensor            # [M, N], the rows of `targets` concatenated
    shape: Shape
    first: Tensor | None = None
    second: Tensor | None = None


@dataclass(frozen=True)
class LocalPlan:
    epochs: int
    lr: float
    damp: float
    seed: int


def _weights(kind: str, units: list[LocalUnit], factors: dict[int, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Weight target -> the dense matrix of its structured map (differentiable in the factors)."""
    out = {}
    for k, (first, second) in factors.items():
        u = units[k]
        w = merged_weight(kind, first, second)
        rows = w.shape[0] // len(u.targets)
        for j, t in enumerate(u.targets):
            out[t] = w[j * rows:(j + 1) * rows]
    return out


def _run(block: Block, hs, ys, ext_by_shape, params) -> tuple[list[Tensor], float]:
    """The block's outputs on `hs` and their relative error ‖out − y‖² / ‖y‖² against `ys`."""
    outs = block_outputs(block, hs, ext_by_shape, params)
    return outs, relative_error(outs, ys)


def _fit_layer(kind: str, block: Block, units: list[LocalUnit], mine: list[int], params: dict, hs, ys,
               ext_by_shape, plan: LocalPlan) -> tuple[list[Tensor], dict]:
    """Factorise and fine-tune the units `mine` of one layer; fills their first/second. Returns the
    structured layer's outputs on `hs` (the next layer's inputs) and statistics."""
    keys = {block.linears[units[k].targets[0]]: str(k) for k in mine}
    rec = GramRecorder(block.gm, keys)
    with torch.no_grad():
        for h in hs:
            rec.run(h, *(ext_by_shape[tuple(h.shape[:2])][n] for n in block.externals),
                    *(params[p] for p in block.params))
    factors = {}
    for k in mine:
        u = units[k]
        factors[k] = factorize(u.shape, u.weight, rec.grams[str(k)] / rec.tokens, plan.damp)

    def forward(h, fs):
        p = dict(params)
        p.update(_weights(kind, units, fs))
        return block(h, ext_by_shape[tuple(h.shape[:2])], p)

    p0 = dict(params)
    p0.update(_weights(kind, units, factors))
    outs, before = _run(block, hs, ys, ext_by_shape, p0)
    after = before
    if plan.epochs > 0:
        trained = {k: (a.clone().requires_grad_(True), b.clone().requires_grad_(True)) for k, (a, b) in factors.items()}
        fit_outputs(lambda h: forward(h, trained), [t for pair in trained.values() for t in pair], hs, ys,
                    plan.epochs, plan.lr, plan.seed + block.index)
        trained = {k: (a.detach(), b.detach()) for k, (a, b) in trained.items()}
        p1 = dict(params)
        p1.update(_weights(kind, units, trained))
        trained_outs, after = _run(block, hs, ys, ext_by_shape, p1)
        if after < before:
            factors, outs = trained, trained_outs
        else:
            after = before
    for k, (a, b) in factors.items():
        units[k].first, units[k].second = a.contiguous(), b.contiguous()
    return outs, {"layer": block.index, "error_before": round(before, 6), "error_after": round(after, 6)}


def local_init(gm: fx.GraphModule, kind: str, units: list[LocalUnit], batches: list[Tensor], empty_cache,
               plan: LocalPlan, progress: bool = True, checkpoint_path: str | None = None,
               fingerprint: str = "") -> dict:
    """Fill every unit's factors layer by layer (module docstring); returns per-layer statistics."""
    prefix, needed, blocks = split_blocks(gm)
    owner = {t: k for k, u in enumerate(units) for t in u.targets}
    hs, ext_by_shape = block_inputs(prefix, needed, batches, empty_cache)
    fp_hs = list(hs)
    layers: list[dict] = []
    start = 0
    saved = load_checkpoint(checkpoint_path, fingerprint, "structured_ffn")
    if saved is not None:
        start, hs, fp_hs, layers = saved["next"], saved["hidden"], saved["fp_hidden"], saved["layers"]
        for k, (a, b) in saved["factors"].items():
            units[int(k)].first, units[int(k)].second = a, b
        log(f"structured_ffn: resuming the layer-by-layer init at layer {start}/{len(blocks)} from {checkpoint_path}")
    t0 = time.perf_counter()
    with bar(total=len(blocks), desc="structured_ffn layer-by-layer init", unit="layer", enabled=progress) as pbar:
        pbar.update(start)
        for block in blocks[start:]:
            params = {t: attr_tensor(gm, t).detach() for t in block.params}
            mine = sorted({owner[t] for t in block.params if t in owner})
            ys = block_outputs(block, fp_hs, ext_by_shape, params)
            if mine:
                hs, stats = _fit_layer(kind, block, units, mine, params, hs, ys, ext_by_shape, plan)
                layers.append(stats)
                pbar.set_postfix(err=f"{stats['error_after']:.4f}")
            else:
                hs = block_outputs(block, hs, ext_by_shape, params)
            fp_hs = ys
            if checkpoint_path:
                done = {str(k): (u.first, u.second) for k, u in enumerate(units) if u.first is not None}
                save_checkpoint(checkpoint_path, fingerprint, next=block.index + 1, hidden=hs, fp_hidden=fp_hs,
                                layers=layers, factors=done)
            pbar.update(1)
    missing = [u.targets for u in units if u.first is None]
    if missing:
        raise RuntimeError(f"structured_ffn: no decoder layer holds {missing}; the layer split missed them")
    return {"layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
