"""Second-moment statistics of layer inputs (XᵀX) and the output error they measure.

For a linear y = x Wᵀ, the summed squared output error of an approximation Ŵ over calibration
inputs X is tr((W − Ŵ) XᵀX (W − Ŵ)ᵀ): XᵀX is all a weight-quantization or factorization method
needs of the data. It is accumulated one batch at a time (memory: one [K, K] matrix per distinct
input), in float64 by default.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx

from llmc.calibration.blocks import decode_inputs
from llmc.calibration.checkpoint import load_checkpoint, save_checkpoint
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


def output_error(weight: Tensor, approx: Tensor, H: Tensor) -> Tensor:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the summed squared output error over the inputs of H = XᵀX
    (differentiable, in the inputs' dtype)."""
    R = weight - approx
    return ((R @ H) * R).sum()


def relative_output_error(weight: Tensor, approx: Tensor, H: Tensor) -> float:
    """‖X (W − Ŵ)ᵀ‖² / ‖X Wᵀ‖² from H = XᵀX, in float64."""
    w, e, h = weight.double(), (weight - approx).double(), H.double()
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
