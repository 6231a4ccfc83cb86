"""AQLM one-shot calibration, streamed block by block (the quantized block's outputs feed the next).

For each decoder block, in order:
  1. run the FP block on the current hidden states (the outputs of the already quantized blocks
     before it), accumulating XᵀX of every linear's input and keeping the block's outputs Y;
  2. quantize each target linear against its XᵀX (`aq.quantize_matrix` for AQLM codes,
     GPTQ for scalar codes);
  3. fine-tune the block's continuous parameters (codebooks and/or scales, norm weights, biases;
     codes fixed) by Adam on ‖block_q(h) − Y‖², the FP outputs on the same inputs;
  4. run the quantized block to produce the next block's inputs.

Memory: two sets of hidden states (inputs and FP outputs), 2 · tokens · hidden · 4 bytes (75 MB
for 32 × 512 tokens of SmolLM2), plus one block's XᵀX matrices. Each finished block is written
to `checkpoint_dir/block_NNN.pt` under a fingerprint of everything that determines it, with the
hidden states after it, so an interrupted run restarts at the first unfinished block.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
from torch import fx

from llmc.calibration import Block, GramRecorder, block_inputs, load_checkpoint, save_checkpoint, split_blocks
from llmc.calibration.blocks import block_outputs, fit_outputs, relative_error
from llmc.graph import attr_tensor, set_attr_tensor
from llmc.passes.pv_quant.aq import AQConfig, quantize_matrix
from llmc.passes.pv_quant.representations import REPRESENTATIONS, VectorCodes, compact_codes
from llmc.progress import bar, log

QuantizedMatrix = VectorCodes  # the default representation


@dataclass(frozen=True)
class FinetunePlan:
    """Block fine-tuning: `epochs` passes over the calibration batches, Adam(lr, betas (0.9, 0.95))."""

    epochs: int = 2
    lr: float = 1e-4
    seed: int = 0


def aq_quantizer(aq: AQConfig):
    """The AQLM quantizer of one matrix: (W, A, seed) -> (VectorCodes, stats)."""

    def quantize(W, A, seed):
        codes, books, scales, stats = quantize_matrix(W, A, dataclasses.replace(aq, seed=seed))
        return VectorCodes(codes, books, scales), stats

    return quantize


def calibrate(gm: fx.GraphModule, batches: list[torch.Tensor], empty_cache, is_target, aq,
              ft: FinetunePlan, progress: bool = True, checkpoint_dir: str | None = None,
              fingerprint: str = "", representation: str = "aq") -> tuple[dict, dict]:
    """Quantize every linear weight whose target satisfies `is_target`, block by block.

    aq: an AQConfig (AQLM codes) or a quantizer `(W, A, seed) -> (codes, stats)` of the named
    `representation` (`pv_quant_repr.REPRESENTATIONS`). Writes the dequantized weights (and tuned
    norms/biases) into `gm` as it goes, so `gm` computes the quantized model afterwards. Returns
    {weight target: codes} and statistics.
    """
    quantize = aq_quantizer(aq) if isinstance(aq, AQConfig) else aq
    cls = REPRESENTATIONS[representation]
    prefix, needed, blocks = split_blocks(gm)
    hs, ext_by_shape = block_inputs(prefix, needed, batches, empty_cache)
    state: dict[str, QuantizedMatrix] = {}
    stats: dict = {"blocks": [], "resumed_blocks": 0}
    start = 0
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        start, hs_resumed = _resume(gm, blocks, state, stats, checkpoint_dir, fingerprint, cls)
        if hs_resumed is not None:
            hs = hs_resumed
    t_start = time.perf_counter()
    with bar(total=len(blocks), desc="pv_quant calibration", unit="block", enabled=progress) as pbar:
        pbar.update(start)
        for block in blocks[start:]:
            t0 = time.perf_counter()
            hs, bstate, bstats = _calibrate_block(gm, block, hs, ext_by_shape, is_target, quantize, ft, progress)
            bstats["seconds"] = round(time.perf_counter() - t0, 1)
            state.update(bstate)
            stats["blocks"].append(bstats)
            if checkpoint_dir:
                tuned = {t: attr_tensor(gm, t).detach() for t in block.params if t not in bstate}
                save_checkpoint(_block_path(checkpoint_dir, block.index), fingerprint, index=block.index,
                                stats=bstats, hidden=hs, quantized={t: _packed_fields(q) for t, q in bstate.items()},
                                tuned=tuned)
                previous = _block_path(checkpoint_dir, block.index - 1)
                saved = load_checkpoint(previous, fingerprint, "pv_quant")
                if saved is not None and saved.get("hidden") is not None:  # only the last block's are needed
                    saved["hidden"] = None
                    save_checkpoint(previous, **saved)
            pbar.update(1)
            errs = [v["relative_error"][-1] for v in bstats["matrices"].values()]
            pbar.set_postfix(err=f"{sum(errs) / max(len(errs), 1):.4f}", ft=f"{bstats['finetune_after']:.4f}")
    stats["seconds"] = round(time.perf_counter() - t_start, 1)
    return state, stats


def _packed_fields(q) -> dict:
    """A representation's fields for a checkpoint, codes in uint8 where they fit (int64 in memory)."""
    return {**dataclasses.asdict(q), "codes": compact_codes(q.codes)}


def _block_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"block_{index:03d}.pt")


def _resume(gm, blocks: list[Block], state, stats, directory: str, fingerprint: str, cls):
    """Load consecutive finished blocks of this run; returns (first unfinished block, its input states)."""
    hs = None
    done = 0
    for block in blocks:
        path = _block_path(directory, block.index)
        if not os.path.exists(path):
            break
        saved = load_checkpoint(path, fingerprint, "pv_quant")
        if saved is None:
            log(f"pv_quant: calibrating from block {block.index}")
            break
        for t, q in saved["quantized"].items():
            state[t] = cls(**{**q, "codes": q["codes"].long()})
            set_attr_tensor(gm, t, state[t].weight().detach())
        for t, v in saved["tuned"].items():
            set_attr_tensor(gm, t, v)
        stats["blocks"].append(saved["stats"])
        hs = saved["hidden"]
        done += 1
    if done:
        if hs is None:  # the last finished block lost its states (should not happen): redo it
            raise RuntimeError(f"pv_quant: checkpoint of block {done - 1} in {directory} has no hidden states; "
                               "delete the folder to start over")
        log(f"pv_quant: resuming calibration at block {done}/{len(blocks)} from {directory}")
    stats["resumed_blocks"] = done
    return done, hs


def _calibrate_block(gm, block: Block, hs, ext_by_shape, is_target, quantize, ft: FinetunePlan, progress: bool):
    params = {t: attr_tensor(gm, t).detach() for t in block.params}
    targets = [t for t in block.linears if is_target(t)]
    # Linears reading one input (q/k/v, gate/up) share its XᵀX; accumulated in float32.
    rec = GramRecorder(block.gm, {block.linears[t]: block.linears[t].args[0] for t in targets}, torch.float32)
    ys = []
    with torch.no_grad():
        for h in hs:
            ext = ext_by_shape[tuple(h.shape[:2])]
            ys.append(rec.run(h, *(ext[n] for n in block.externals), *(params[p] for p in block.params)))
    quantized = {}
    mstats = {}
    for t in bar(targets, desc=f"block {block.index}", unit="matrix", enabled=progress):
        A = rec.grams[block.linears[t].args[0]] / rec.tokens
        quantized[t], mstats[t] = quantize(params[t], A, ft.seed + 1009 * block.index + len(quantized))
    before, after = _finetune_block(block, hs, ys, ext_by_shape, params, quantized, ft)
    for t, q in quantized.items():
        params[t] = q.weight().detach()
    out = block_outputs(block, hs, ext_by_shape, params)
    for t in block.params:  # dequantized weights and tuned norms/biases into the full graph
        if t in quantized or params[t] is not attr_tensor(gm, t):
            set_attr_tensor(gm, t, params[t].detach().clone())
    return out, quantized, {"index": block.index, "matrices": mstats,
                            "finetune_before": round(before, 6), "finetune_after": round(after, 6)}


def _finetune_block(block: Block, hs, ys, ext_by_shape, params: dict, quantized: dict, ft: FinetunePlan):
    """Adam on codebooks, scales and the block's 1-D parameters against the FP outputs; returns the
    relative output error ‖block_q(h) − Y‖² / ‖Y‖² before and after (over all batches)."""
    free = {t: params[t].detach().clone().requires_grad_(True) for t in block.params
            if t not in quantized and params[t].dim() == 1 and params[t].is_floating_point()}
    trainable = list(free.values())
    for q in quantized.values():
        for x in q.continuous():
            x.requires_grad_(True)
        trainable += q.continuous()

    def forward(h):
        p = dict(params)
        p.update(free)
        for t, q in quantized.items():
            p[t] = q.weight()
        return block(h, ext_by_shape[tuple(h.shape[:2])], p)

    def error() -> float:
        with torch.no_grad():
            return relative_error((forward(h) for h in hs), ys)

    before = error()
    snapshot = [t.detach().clone() for t in trainable]
    fit_outputs(forward, trainable, hs, ys, ft.epochs, ft.lr, ft.seed + block.index)
    after = error() if ft.epochs > 0 else before
    if after > before:  # fine-tuning made it worse (too few batches or too high a rate): keep the start
        with torch.no_grad():
            for t, v in zip(trainable, snapshot):
                t.copy_(v)
        after = before
    for q in quantized.values():
        q.set_continuous([x.detach() for x in q.continuous()])
    for t, v in free.items():
        params[t] = v.detach()
    return before, after
