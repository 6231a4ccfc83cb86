"""Context-aware attribution of FFN neurons by integrated gradients, on the decode-step graph.

For one example (a prompt with its context, the same prompt without it, and the first token y of the
context-consistent answer), the score of neuron i of layer l is the integrated gradient of
p(y | with-context prompt) with respect to the input of layer l's `down_proj` at the last prompt
position, from the no-context activation a_wo to the with-context activation a_w:

    plain (the paper):  attr_i = (a_w,i - a_wo,i) / m * sum_{k=1..m} dp/da_i (a_k)
    alpha (the reference code): the same with each term weighted by alpha_k = k/m
    where a_k = a_wo + (k/m) (a_w - a_wo).

Why it is fast and still exact: overriding the last position's activation at layer l changes only the
last position's computation in layers >= l; every earlier position, hence the key/value cache the last
position attends to, is that of the unmodified with-context prompt. So the prompt minus its last token
runs once (its cache is kept), the last token runs once more at batch m with everything recorded, and
for each layer a *suffix graph* re-runs only what depends on that layer's activation (the rest of
layer l's FFN, layers l+1.., the final norm and the LM head), batched over the m points, with the
gradient taken to the activation only.

The suffix graphs are cut out of the traced step graph itself (not the Hugging Face module), so the
attribution sees exactly the graph the pass rewrites, whatever ran on it before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx

from llmc.errors import PassError
from llmc.graph import ancestors, module_fqn

_DOWN = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.down_proj$")
IG_METHODS = ("plain", "alpha")


def down_proj_linears(gm: fx.GraphModule) -> list[fx.Node]:
    """The `aten.linear` node of every layer's `mlp.down_proj` with a stored weight, in layer order."""
    found = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            m = _DOWN.search(module_fqn(n))
            w = n.args[1]
            if m and isinstance(w, fx.Node) and w.op == "get_attr":
                found[int(m.group(1))] = n
    if not found:
        raise PassError("ircan: the graph has no `layers.N.mlp.down_proj` linear with a stored dense weight; "
                        "run ircan before passes that quantize or restructure the FFN")
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - set(found))
        raise PassError(f"ircan: no dense down_proj linear in layers {missing}; run ircan before passes that "
                        "rewrite them")
    return [found[i] for i in range(len(found))]


def _outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    vals = out.args[0]
    return list(vals) if isinstance(vals, (tuple, list)) else [vals]


def subgraph(gm: fx.GraphModule, outputs: list[fx.Node], inputs: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing `outputs` (as a tuple) from `inputs` (its placeholders, in order).

    Only the nodes between them are copied; attributes stay `get_attr` reads of `gm`'s tensors.
    A node needed that is neither computed from `inputs` nor an attribute is a PassError.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for k, n in enumerate(inputs):
        env[n] = g.placeholder(f"in_{k}")
    needed, stack = set(), list(outputs)
    while stack:
        n = stack.pop()
        if n in needed or n in env:
            continue
        if n.op == "placeholder":
            raise PassError(f"ircan: the graph input {n.name} is needed but was not given to the subgraph")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, g)


def _expand(t, batch: int):
    return t.expand(batch, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t


@dataclass
class Attribution:
    """Scores [L, f] of one example, and the probabilities around them (floats)."""

    scores: torch.Tensor       # [layers, intermediate]
    p_with: float              # p(y | with-context prompt)
    p_without: float           # p(y | no-context prompt)


class Attributor:
    """Fast exact integrated-gradient attribution over every layer's down_proj input.

    gm: the decode-step GraphModule `(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`.
    empty_cache: `batch -> list of empty cache tensors` (Program.empty_cache).
    steps: m, the number of Riemann points; method: "plain" (paper) or "alpha" (reference code).
    """

    def __init__(self, gm: fx.GraphModule, empty_cache, steps: int = 20, method: str = "plain"):
        if method not in IG_METHODS:
            raise ValueError(f"method must be one of {IG_METHODS}, got {method!r}")
        self.steps, self.method, self.empty_cache = steps, method, empty_cache
        graph_inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        outs = _outputs(gm)
        logits, presents = outs[0], outs[1:]
        self.linears = down_proj_linears(gm)
        self.acts = [lin.args[0] for lin in self.linears]
        feeds_logits = ancestors(logits)
        order = {n: k for k, n in enumerate(gm.graph.nodes)}
        self.suffixes: list[fx.GraphModule] = []
        self.externals: list[list[fx.Node]] = []
        for act in self.acts:
            # Nodes that depend on this activation and feed the logits, and what else they read.
            dep, stack = set(), [act]
            while stack:
                for u in stack.pop().users:
                    if u in feeds_logits and u not in dep:
                        dep.add(u)
                        stack.append(u)
            ext = []
            for n in sorted(dep, key=order.__getitem__):
                for a in n.all_input_nodes:
                    if a not in dep and a is not act and a.op != "get_attr" and a not in ext:
                        ext.append(a)
            self.externals.append(ext)
            self.suffixes.append(subgraph(gm, [logits], [act, *ext]))
        recorded = list(dict.fromkeys([logits, *self.acts, *(e for ext in self.externals for e in ext)]))
        self.recorded = recorded
        self.record = subgraph(gm, recorded, graph_inputs)      # one full step, recording every cut value
        self.prefix = subgraph(gm, presents, graph_inputs)      # the prompt's cache, without the LM head

    @property
    def num_layers(self) -> int:
        return len(self.acts)

    def last_activations(self, ids: list[int]) -> torch.Tensor:
        """The down_proj inputs [L, f] at the last position of a prompt (token ids)."""
        rec = self._last_step(ids, 1)
        return torch.stack([rec[a][0, -1] for a in self.acts])

    def _p(self, rec: dict, target: int) -> float:
        return float(torch.softmax(rec[self.recorded[0]][0, -1].float(), -1)[target])

    @torch.no_grad()
    def _last_step(self, ids: list[int], batch: int) -> dict:
        """Run the prompt but its last token once, then its last token at `batch`: the recorded values."""
        x = torch.tensor([ids], dtype=torch.long)
        P = x.shape[1] - 1
        past = self.prefix(x[:, :P], torch.ones(1, P, dtype=torch.long), torch.arange(P)[None],
                           *self.empty_cache(1)) if P else self.empty_cache(1)
        past = [_expand(t, batch) for t in past]
        vals = self.record(x[:, P:].expand(batch, 1), torch.ones(batch, P + 1, dtype=torch.long),
                           torch.full((batch, 1), P, dtype=torch.long), *past)
        return dict(zip(self.recorded, vals))

    def points(self) -> torch.Tensor:
        """alpha_k = k/m, k = 1..m."""
        return torch.arange(1, self.steps + 1, dtype=torch.float64) / self.steps

    def probability(self, layer: int, acts: torch.Tensor, rec: dict, target: int, grad: bool = False):
        """p(target) [B] with the last position's down_proj input of `layer` set to `acts` [B, f]
        (B = the batch `rec` was recorded at), and dp/dacts [B, f] when `grad`."""
        B, f = acts.shape
        a = acts.reshape(B, 1, f).to(rec[self.acts[layer]].dtype).detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            (logits,) = self.suffixes[layer](a, *(rec[e] for e in self.externals[layer]))
            p = torch.softmax(logits[:, -1].float(), dim=-1)[:, target]
            if not grad:
                return p.detach()
            (g,) = torch.autograd.grad(p.sum(), a)
        return p.detach(), g.reshape(B, f)

    def __call__(self, with_ids: list[int], without_ids: list[int], target: int) -> Attribution:
        m = self.steps
        rec_wo = self._last_step(without_ids, 1)
        a_wo = torch.stack([rec_wo[a][0, -1] for a in self.acts]).float()  # [L, f]
        rec = self._last_step(with_ids, m)
        a_w = torch.stack([rec[a][0, -1] for a in self.acts]).float()     # [L, f]
        p_with, p_without = self._p(rec, target), self._p(rec_wo, target)
        alphas = self.points().float()
        weights = alphas / m if self.method == "alpha" else torch.full_like(alphas, 1.0 / m)
        scores = torch.empty_like(a_w)
        for layer in range(self.num_layers):
            diff = a_w[layer] - a_wo[layer]
            pts = a_wo[layer][None] + alphas[:, None] * diff[None]      # [m, f]
            _, g = self.probability(layer, pts, rec, target, grad=True)
            scores[layer] = diff * (weights[:, None] * g.float()).sum(0)
        return Attribution(scores, p_with, p_without)
