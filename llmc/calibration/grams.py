"""Second-moment statistics of layer inputs (XᵀX) and the output error they measure.

For a linear y = x Wᵀ, the summed squared output error of an approximation Ŵ over calibration
inputs X is tr((W − Ŵ) XᵀX (W − Ŵ)ᵀ): XᵀX is all a weight-quantization or factorization method
needs of the data. It is accumulated one batch at a time (memory: one [K, K] matrix per distinct
input), in float64 by default.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, fx

from llmc.calibration.blocks import decode_inputs
from llmc.calibration.checkpoint import load_checkpoint, save_checkpoint
from llmc.errors import PassError
from llmc.progress import bar, log


class GramRecorder(fx.Interpreter):
    """Runs a graph and adds xᵀx of the first argument of each watched node to `grams[key]`.

    watch: node -> key. Nodes reading the same input should share a key: a key's input is
    accumulated once per run however many watched nodes read it. Each batch's xᵀx is computed in
    float32 and accumulated in `dtype`. `tokens` counts the rows seen by the first key.
    """

    def __init__(self, gm: fx.GraphModule, watch: dict, dtype: torch.dtype = torch.float64):
        super().__init__(gm)
        self.watch: dict = {}
        for node, key in watch.items():
            if key not in self.watch.values():
                self.watch[node] = key
        self.dtype = dtype
        self.grams: dict = {}
        self.tokens = 0
        self._first = next(iter(self.watch.values()), None)

    def run_node(self, n: fx.Node):
        key = self.watch.get(n)
        if key is not None:
            x = self.env[n.args[0]]
            x = x.reshape(-1, x.shape[-1]).float()
            g = (x.t() @ x).to(self.dtype)
            self.grams[key] = self.grams[key] + g if key in self.grams else g
            if key == self._first:
                self.tokens += x.shape[0]
        return super().run_node(n)


@torch.no_grad()
def input_grams(gm: fx.GraphModule, watch: dict[fx.Node, str], batches, empty_cache, progress: bool = True,
                cache_path: str | None = None, fingerprint: str = "", label: str = "calibration") -> dict[str, Tensor]:
    """XᵀX [K, K] (float64) of the inputs of the `watch` nodes over all calibration batches of the full graph.

    watch: node -> key (see GramRecorder). With `cache_path`, the result is loaded from / saved to
    that file under `fingerprint`.
    """
    saved = load_checkpoint(cache_path, fingerprint, label)
    if saved is not None:
        log(f"{label}: calibration statistics from {cache_path}")
        return saved["grams"]
    rec = GramRecorder(gm, watch)
    for ids in bar(batches, desc=f"{label} calibration", unit="batch", enabled=progress):
        mask, pos = decode_inputs(ids)
        rec.run(ids, mask, pos, empty_cache(ids.shape[0]))
    if cache_path:
        save_checkpoint(cache_path, fingerprint, grams=rec.grams)
    return rec.grams


def stream_grams(gm: fx.GraphModule, watch: dict[fx.Node, str], batches, empty_cache, progress: bool = True,
                 label: str = "calibration", checkpoint_dir: str | None = None, fingerprint: str = ""):
    """The XᵀX of `input_grams`, yielded one part at a time: {key: XᵀX} of the keys read in decoder
    layer 0, then layer 1, ..., then those of the head (final norm and LM head), each computed on
    the float model's residual stream block by block (`split_blocks`), so that only one layer's
    matrices are held at once. A graph that does not split into blocks yields one part, from
    `input_grams`. Watched nodes must be linears of stored weights.

    With `checkpoint_dir`, part k is kept there as `<label>-grams-<fingerprint>-part<k>.pt` as soon as
    it is made; a part kept by an earlier run under the same fingerprint is yielded without
    recording, and the stream is advanced through its block only when a later part needs it (a
    resumed run does no more work than what is missing).
    """
    def path(k):
        return os.path.join(checkpoint_dir, f"{label}-grams-{fingerprint}-part{k}.pt") if checkpoint_dir else None

    for k, grams in enumerate(_stream_grams(gm, watch, batches, empty_cache, progress, label, path, fingerprint)):
        if checkpoint_dir and not os.path.exists(path(k)):
            os.makedirs(checkpoint_dir, exist_ok=True)
            save_checkpoint(path(k), fingerprint, grams=grams)
        yield grams


@torch.no_grad()
def _stream_grams(gm, watch, batches, empty_cache, progress, label, path, fingerprint):
    from llmc.calibration.blocks import block_inputs, split_blocks, split_head
    from llmc.graph import attr_tensor

    def cached(k):
        saved = load_checkpoint(path(k), fingerprint, label) if path(k) else None
        return saved["grams"] if saved is not None else None

    by_weight = {n.args[1].target: key for n, key in watch.items()}
    try:
        prefix, needed, blocks = split_blocks(gm)
        head = split_head(gm)
    except PassError as e:
        log(f"{label} records every layer at once, not one at a time ({e})")
        yield cached(0) or input_grams(gm, watch, batches, empty_cache, progress, label=label)
        return
    hs = ext = None
    at = 0  # hs holds the stream entering block `at`
    parts = [(blk, {node: by_weight[t] for t, node in blk.linears.items() if t in by_weight}) for blk in blocks]
    head_linears = {n: by_weight[n.args[1].target] for n in head.graph.nodes if n.op == "call_function"
                    and n.target is torch.ops.aten.linear.default and n.args[1].op == "get_attr"
                    and n.args[1].target in by_weight}
    parts.append((None, head_linears))
    for k, (blk, sub_watch) in enumerate(bar(parts, desc=f"{label} calibration", unit="layer", enabled=progress)):
        kept = cached(k)
        if kept is not None:
            yield kept
            continue
        if hs is None:
            hs, by_shape = block_inputs(prefix, needed, batches, empty_cache)
            ext = [by_shape[tuple(h.shape[:2])] for h in hs]
        for skipped, _ in parts[at:k]:  # catch up through blocks whose parts were kept
            params = {t: attr_tensor(gm, t).detach() for t in skipped.params}
            hs = [skipped(h, e, params) for h, e in zip(hs, ext)]
        at = k
        if blk is None:
            rec = GramRecorder(head, sub_watch)
            for h in hs:
                rec.run(h)
        else:
            params = {t: attr_tensor(gm, t).detach() for t in blk.params}
            rec = GramRecorder(blk.gm, sub_watch)
            hs = [rec.run(h, *(e[n] for n in blk.externals), *(params[p] for p in blk.params)) for h, e in zip(hs, ext)]
            at = k + 1
        yield rec.grams


def output_error(weight: Tensor, approx: Tensor, H: Tensor) -> Tensor:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the summed squared output error over the inputs of H = XᵀX
    (differentiable, in the inputs' dtype)."""
    R = weight - approx
    return ((R @ H) * R).sum()


def relative_output_error(weight: Tensor, approx: Tensor, H: Tensor) -> float:
    """‖X (W − Ŵ)ᵀ‖² / ‖X Wᵀ‖² from H = XᵀX, in float64."""
    w, e, h = weight.double(), (weight - approx).double(), H.double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
