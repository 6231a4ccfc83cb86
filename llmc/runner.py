"""Running a Program's graph in eager PyTorch, fast enough for token-by-token decoding.

The traced decode step is one GraphModule whose generated `forward` has a local variable per
node (about 1,700 for SmolLM2). CPython 3.11 keeps frames on a data stack of 16 KiB chunks; a
frame that large does not fit, so every call maps a fresh chunk and unmaps it on return, and
the new pages fault in again on every decode step. `TorchRunner` splits the graph per decoder
layer (`torch.fx.passes.split_module`, weights shared, same ops in the same order), so each
generated function is small, and calls it with flat arguments.
"""

from __future__ import annotations

import re

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from llmc.graph import module_fqn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def split_by_layer(gm: fx.GraphModule) -> fx.GraphModule:
    """The same computation as `gm`, as one submodule per decoder layer.

    Nodes are assigned in graph order to the layer of the last node traced inside
    `...layers.{i}...` (nodes before the first layer form partition 0), so the partitions form a
    chain and no node moves across another.
    """
    partition: dict = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        m = _LAYER.search(module_fqn(node))
        if m:
            current = int(m.group(1)) + 1
        partition[node] = current
    return split_module(gm, gm, lambda n: partition[n], keep_original_order=True)


class TorchRunner:
    """Calls a Program's decode step through a per-layer split of its graph."""

    def __init__(self, program):
        self.program = program
        self._source = None
        self._module = None

    def _module_for_current_graph(self) -> fx.GraphModule:
        if self._source is not self.program.gm:  # passes may have replaced the graph
            self._module = split_by_layer(self.program.gm)
            self._source = self.program.gm
        return self._module

    def step(self, input_ids, attention_mask, position_ids, past):
        """`(input_ids, attention_mask, position_ids, past) -> (logits, present)`, without autograd."""
        module = self._module_for_current_graph()
        with torch.inference_mode():
            out = module(input_ids, attention_mask, position_ids, *past)
        return out[0], list(out[1:])
