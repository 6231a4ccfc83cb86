"""Selecting context-aware neurons from attribution scores, and reweighting them in the weights."""

from __future__ import annotations

import torch
from torch import fx

from llmc.graph import get_attr_tensor, set_attr_tensor


def example_neurons(scores: torch.Tensor, ratio: float = 0.1, top: int = 20) -> list[tuple[int, int, float]]:
    """(layer, neuron, score) of one example: the scores >= ratio x the example's maximum, highest
    first, at most `top` of them (ties: lower layer, then lower index first). None when no score is
    positive."""
    flat = scores.reshape(-1).double()
    if flat.numel() == 0:
        return []
    best = float(flat.max())
    if best <= 0:  # no neuron pushes towards the context's answer
        return []
    keep = (flat >= ratio * best).nonzero().reshape(-1)
    # Sort by descending score; stable sort keeps (layer, neuron) order among ties.
    keep = keep[torch.sort(-flat[keep], stable=True).indices][:top]
    f = scores.shape[-1]
    return [(int(i) // f, int(i) % f, float(flat[i])) for i in keep]


def rank_neurons(per_example: list[list[tuple[int, int, float]]]) -> list[dict]:
    """Every (layer, neuron) kept by some example, most frequent first (ties: larger summed score,
    then lower layer and index), with its count and summed score."""
    count: dict[tuple[int, int], int] = {}
    total: dict[tuple[int, int], float] = {}
    for triplets in per_example:
        for layer, neuron, score in triplets:
            count[(layer, neuron)] = count.get((layer, neuron), 0) + 1
            total[(layer, neuron)] = total.get((layer, neuron), 0.0) + score
    order = sorted(count, key=lambda k: (-count[k], -total[k], k))
    return [{"layer": k[0], "neuron": k[1], "count": count[k], "score_sum": total[k]} for k in order]


def reweight(gm: fx.GraphModule, linears: list[fx.Node], neurons: list[tuple[int, int]], beta: float) -> dict:
    """Scale the down_proj weight column of every (layer, neuron) by beta (new tensors, never in place).

    `linears[l]` is layer l's down_proj linear node. Returns {weight FQN: [neurons scaled]}.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)
    changed = {}
    for layer, idx in sorted(by_layer.items()):
        w_node = linears[layer].args[1]
        w = get_attr_tensor(gm, w_node)
        new = w.detach().clone()
        cols = torch.tensor(sorted(set(idx)), dtype=torch.long)
        new[:, cols] = new[:, cols] * beta
        set_attr_tensor(gm, w_node.target, new)
        changed[w_node.target] = cols.tolist()
    return changed
