"""ircan: find context-aware FFN neurons by integrated gradients and scale their down_proj columns by β.

IRCAN (Shi et al., arXiv 2406.18406). Attribution (`attribution.py`) scores every FFN neuron of every
layer on each example; selection (`select.py`) keeps per example the scores >= `ratio` x its maximum,
at most `top`, counts the (layer, neuron) pairs over the examples and keeps the `h` most frequent;
their `down_proj` weight columns are multiplied by `beta` in the weights, so the change survives every
later pass and the export. See docs/passes/ircan.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import fx

from llmc.calibration import fingerprint, load_checkpoint, save_checkpoint
from llmc.compiled import CompiledModel
from llmc.context_tasks import TASKS, Example, answer_token, context_following, encode, load_examples, task_file
from llmc.errors import ConfigError, DataError, PassError
from llmc.fsutil import atomic_file
from llmc.graph import attr_tensor, get_attr_tensor, graph_digest, set_attr_tensor
from llmc.passes_base import Pass, PassContext, PassResult, register_pass
from llmc.progress import bar, log

from llmc.passes.ircan.attribution import IG_METHODS, Attribution, Attributor, down_proj_linears
from llmc.passes.ircan.select import example_neurons, rank_neurons, reweight

__all__ = ["IRCAN", "Attributor", "Attribution", "Example", "load_examples", "example_neurons", "rank_neurons",
           "reweight", "read_neurons", "NEURONS_FORMAT"]

logger = logging.getLogger(__name__)
NEURONS_FORMAT = "llmc-ircan-neurons/1"


def _opt(help_text: str, default=None):
    return field(default=default, metadata={"help": help_text})


@register_pass("ircan")
@dataclass(frozen=True)
class IRCAN(Pass):
    """Scale the down_proj columns of the `h` most context-aware FFN neurons by `beta`.

    Matches: the `aten.linear` of every `layers.N.mlp.down_proj` with a stored dense weight. Emits no
    node: the selected weight columns are replaced by β times themselves. Numerics: changes the model
    on purpose (β = 1 leaves it unchanged).
    """

    data: str | None = _opt("MemoTrap JSONL or KRE JSON file to mine neurons on (recognised by its fields)")
    task: str | None = _opt("memotrap | cose: the shared dev file of that task")
    samples: int = _opt("how many examples of the file to mine (the first ones); 0: all", 0)
    h: int | None = _opt("how many neurons to reweight (the most frequent over the examples)")
    beta: float | None = _opt("the factor of their down_proj columns (0 erases them, 1 changes nothing)")
    neurons: str | None = _opt("a neurons JSON written by an earlier run: reuse its ranking, skip attribution")
    steps: int = _opt("m, the Riemann points of the integrated gradients", 20)
    ig: str = _opt("plain (the paper's IG) | alpha (the reference code's alpha-weighted sum)", "plain")
    top: int = _opt("neurons kept per example (highest scores)", 20)
    ratio: float = _opt("per example, keep scores >= ratio x its maximum", 0.1)
    grid_h: tuple[int, ...] = _opt("h values the grid search on the data tries when h is not given (e.g. 2+4+8+14)",
                                   (2, 4, 8, 14))
    grid_beta: tuple[float, ...] = _opt("beta values the grid search tries when beta is not given (e.g. 2+3+5+8+12)",
                                        (2.0, 3.0, 5.0, 8.0, 12.0))
    grid_samples: int = _opt("examples of the file each grid setting is scored on (the first ones); 0: all", 200)
    random: int | None = _opt("the random-neuron control: reweight h neurons drawn uniformly over all layers, "
                              "seeded by this, instead of the most context-aware ones")
    checkpoint_dir: str | None = _opt("folder caching each example's attribution (default: DUMP_DIR/ircan)")
    neurons_out: str | None = _opt("where to write the neurons JSON (default: DUMP_DIR/ircan_neurons.json)")

    requires = ("dense_linear_weights",)

    def __post_init__(self):
        given = [k for k in ("data", "task", "neurons") if getattr(self, k) is not None]
        if not given:
            raise ConfigError("ircan needs examples to mine neurons on, data=PATH (MemoTrap JSONL or KRE JSON) or "
                              "task=memotrap|cose, or a saved selection, neurons=FILE")
        if len(given) > 1:
            raise ConfigError(f"ircan: give only one of data=, task=, neurons= (got {', '.join(given)}); neurons=FILE "
                              "reuses a selection mined earlier, data/task mine a new one")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"ircan.task is one of {', '.join(TASKS)} (their dev files), got '{self.task}'; "
                              "pass data=PATH for another file")
        for key in ("data", "neurons"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"ircan.{key}: no such file: {path}")
        _check_int("h", self.h, 1, allow_none=True)
        _check_int("samples", self.samples, 0)
        _check_int("grid_samples", self.grid_samples, 0)
        _check_int("random", self.random, 0, allow_none=True)
        if not self.grid_h or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.grid_h):
            raise ConfigError(f"ircan.grid_h lists the h values to try, integers >= 1 joined by '+' (e.g. 2+4+8), "
                              f"got {self.grid_h!r}")
        if not self.grid_beta or not all(_is_beta(b) for b in self.grid_beta):
            raise ConfigError(f"ircan.grid_beta lists the beta values to try, numbers >= 0 joined by '+' (e.g. "
                              f"2+3+5), got {self.grid_beta!r}")
        _check_int("steps", self.steps, 1)
        _check_int("top", self.top, 1)
        if self.beta is not None and not _is_beta(self.beta):
            raise ConfigError(f"ircan.beta is the factor of the selected down_proj columns, a number >= 0 (0 erases "
                              f"the neurons, 1 changes nothing), got {self.beta!r}")
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio <= 1:
            raise ConfigError(f"ircan.ratio is the fraction of an example's top score a neuron must reach, in [0, 1], "
                              f"got {self.ratio!r}")
        if self.ig not in IG_METHODS:
            raise ConfigError(f"ircan.ig is 'plain' (the paper's integrated gradients) or 'alpha' (the reference "
                              f"code's alpha-weighted sum), got '{self.ig}'")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        program = ctx.program
        if program is None:
            raise PassError("ircan needs the Program (its tokenizer and cache) in the pass context; run it through "
                            "llmc.compile or a PassManager")
        linears = down_proj_linears(gm)
        if self.neurons is not None:
            doc = read_neurons(self.neurons)
            h = self.h if self.h is not None else doc.get("h")
            beta = self.beta if self.beta is not None else doc.get("beta")
            if h is None or beta is None:
                raise ConfigError(f"ircan: {self.neurons} holds no h/beta; pass h= and beta= (or mine again with "
                                  "data= or task= to grid-search them)")
            IRCAN(neurons=self.neurons, h=h, beta=beta)  # the file's values pass the same checks as options
            ranking, out_path = doc["ranking"], None
            source = {"neurons": os.path.abspath(os.path.expanduser(self.neurons))}
        else:
            doc = self._mine(gm, ctx, program)
            ranking = doc["ranking"]
            h, beta = self.h, self.beta
            if h is None or beta is None:
                h, beta, doc["grid"] = self._grid_search(gm, ctx, program, linears, ranking, doc["data"])
            doc.update(h=h, beta=beta)
            out_path = self._write(doc, ctx)
            source = {"data": doc["data"], "examples": len(doc["examples"])}
            if "grid" in doc:
                source["grid"] = {"examples": doc["grid"]["examples"], "best": [h, beta]}
        selected = [(int(r["layer"]), int(r["neuron"])) for r in ranking[:h]]
        if self.random is not None:
            width = get_attr_tensor(gm, linears[0].args[1]).shape[1]
            selected = random_neurons(len(linears), width, h, self.random)
        where = self.neurons or "the mined ranking"
        for layer, neuron in selected:
            if layer >= len(linears):
                raise DataError(f"ircan: {where} selects layer {layer} neuron {neuron}, outside this model "
                                f"({len(linears)} layers); was it mined on another model?")
            width = get_attr_tensor(gm, linears[layer].args[1]).shape[1]
            if neuron >= width:
                raise DataError(f"ircan: {where} selects layer {layer} neuron {neuron}, outside this model "
                                f"({width} neurons per layer); was it mined on another model?")
        modified = bool(selected) and beta != 1
        changed = reweight(gm, linears, selected, float(beta)) if modified else {}
        if modified:
            gm.recompile()
        if self.random is not None:
            source["random"] = self.random
        stats = {**source, "h": h, "beta": beta, "selected": [list(s) for s in selected],
                 "layers": sorted({s[0] for s in selected}), "weights": sorted(changed),
                 "neurons_file": out_path}
        if not selected:
            stats["note"] = "no neuron was selected (no example had a positive score)"
        elif not modified:
            stats["note"] = "beta = 1: the weights are unchanged"
        return PassResult(gm, modified, stats)

    def _mine(self, gm: fx.GraphModule, ctx: PassContext, program) -> dict:
        path = task_file(self.task) if self.task is not None else os.path.abspath(os.path.expanduser(self.data))
        path = str(path)
        if "test" in os.path.basename(path):
            log(f"ircan: mining neurons on {path}; select neurons and tune h/beta on dev data, report on test")
        examples = load_examples(path)
        if self.samples:
            examples = examples[:self.samples]
        tok = program.tokenizer
        if tok is None:
            raise PassError("ircan needs the model's tokenizer to encode the prompts; compile with tokenizer=")
        attributor = Attributor(gm, program.empty_cache, self.steps, self.ig)
        cache = self.checkpoint_dir or (os.path.join(ctx.dump_dir, "ircan") if ctx.dump_dir else None)
        model_fp = graph_digest(gm) if cache else ""
        rows, kept = [], []
        for ex in bar(examples, desc="ircan attribution", unit="example", enabled=ctx.progress):
            with_ids, without_ids = encode(tok, ex.with_context), encode(tok, ex.without_context)
            target = answer_token(tok, ex.answer, ex.where)
            att = self._attribute(attributor, cache, model_fp, with_ids, without_ids, target)
            triplets = example_neurons(att.scores, self.ratio, self.top)
            kept.append(triplets)
            rows.append({"where": ex.where, "answer": ex.answer, "target": target, "p_with": att.p_with,
                         "p_without": att.p_without, "neurons": [[l, n, s] for l, n, s in triplets]})
        with open(path, "rb") as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        return {"format": NEURONS_FORMAT, "model": getattr(program, "name", ""), "data": path, "data_sha256": sha,
                "steps": self.steps, "ig": self.ig, "top": self.top, "ratio": self.ratio,
                "ranking": rank_neurons(kept), "examples": rows}

    def _grid_search(self, gm, ctx, program, linears, ranking, path) -> tuple[int, float, dict]:
        """The (h, beta) with the best accuracy on the first `grid_samples` examples of the file (ties: lower
        stubbornness, then smaller h, then smaller beta), trying `grid_h` x `grid_beta` where not given."""
        hs = (self.h,) if self.h is not None else tuple(sorted(set(self.grid_h)))
        betas = (self.beta,) if self.beta is not None else tuple(sorted(set(float(b) for b in self.grid_beta)))
        examples = load_examples(path)
        if self.grid_samples:
            examples = examples[:self.grid_samples]
        model = _scratch_model(gm, program)
        weights = {layer: attr_tensor(model.program.gm, linears[layer].args[1].target)
                   for layer in {int(r["layer"]) for r in ranking[:max(hs)]}}
        base = context_following(model, examples, progress=False)  # the model as it is: what IRCAN must beat
        log(f"ircan grid: unmodified: accuracy {base['accuracy']:.3f} stubbornness {base['stubbornness']:.3f}")
        rows = []
        settings = [(h, b) for h in hs for b in betas]
        for h, beta in bar(settings, desc="ircan grid search", unit="setting", enabled=ctx.progress):
            selected = [(int(r["layer"]), int(r["neuron"])) for r in ranking[:h]]
            with _scaled(weights, selected, beta):
                score = context_following(model, examples, progress=False)
            rows.append({"h": h, "beta": beta, "accuracy": score["accuracy"], "stubbornness": score["stubbornness"]})
            log(f"ircan grid: h={h} beta={beta:g}: accuracy {score['accuracy']:.3f} "
                f"stubbornness {score['stubbornness']:.3f}")
        best = min(rows, key=lambda r: (-r["accuracy"], r["stubbornness"], r["h"], r["beta"]))
        log(f"ircan grid: chose h={best['h']} beta={best['beta']:g} ({len(examples)} examples of {path})")
        return best["h"], best["beta"], {"examples": len(examples), "rows": rows, "baseline": {
            "accuracy": base["accuracy"], "stubbornness": base["stubbornness"]}}

    def _attribute(self, attributor, cache, model_fp, with_ids, without_ids, target) -> Attribution:
        if not cache:
            return attributor(with_ids, without_ids, target)
        fp = fingerprint({"steps": self.steps, "ig": self.ig, "with": with_ids, "without": without_ids,
                          "target": target}, model_fp)
        path = os.path.join(os.path.expanduser(cache), f"ircan-{fp}.pt")
        saved = load_checkpoint(path, fp, "ircan")
        if saved is not None:
            return Attribution(saved["scores"], float(saved["p_with"]), float(saved["p_without"]))
        att = attributor(with_ids, without_ids, target)
        save_checkpoint(path, fp, scores=att.scores, p_with=att.p_with, p_without=att.p_without)
        return att

    def _write(self, doc: dict, ctx: PassContext) -> str | None:
        path = self.neurons_out or (os.path.join(ctx.dump_dir, "ircan_neurons.json") if ctx.dump_dir else None)
        if path is None:
            return None
        path = os.path.abspath(os.path.expanduser(path))
        with atomic_file(path) as tmp, open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        log(f"ircan: neurons written to {path}")
        return path


def random_neurons(layers: int, width: int, h: int, seed: int) -> list[tuple[int, int]]:
    """h distinct (layer, neuron) pairs drawn uniformly from layers x width (the paper's ERN control)."""
    if h > layers * width:
        raise ConfigError(f"ircan: h={h} is more than the model's {layers * width} neurons")
    flat = torch.randperm(layers * width, generator=torch.Generator().manual_seed(seed))[:h]
    return sorted((int(i) // width, int(i) % width) for i in flat)


def _is_beta(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _scratch_model(gm: fx.GraphModule, program) -> CompiledModel:
    """A torch runtime over a fork of the program whose down_proj weights are its own copies, so scaling them
    in place never touches `gm` (get them from `model.program.gm` after this: the runner re-stores them)."""
    fork = dataclasses.replace(program, gm=gm).fork()
    for node in down_proj_linears(fork.gm):
        name = node.args[1].target
        set_attr_tensor(fork.gm, name, attr_tensor(fork.gm, name).detach().clone())
    return CompiledModel(fork)


@contextlib.contextmanager
def _scaled(weights: dict, selected: list[tuple[int, int]], beta: float):
    """Scale the selected columns of the scratch model's down_proj weights in place, and restore them."""
    saved = {}
    with torch.no_grad():
        for layer, neuron in selected:
            w = weights[layer]
            saved[(layer, neuron)] = w[:, neuron].clone()
            w[:, neuron] *= beta
    try:
        yield
    finally:
        with torch.no_grad():
            for (layer, neuron), col in saved.items():
                weights[layer][:, neuron] = col


def _check_int(name: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"ircan.{name} must be an integer >= {low}, got {value!r}")


def read_neurons(path: str) -> dict:
    """A neurons JSON written by the pass (checked: its format and its ranking's entries)."""
    path = os.path.expanduser(path)
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected a neurons file written by ircan") from None
    except OSError as e:
        raise DataError(f"ircan: cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != NEURONS_FORMAT:
        raise DataError(f"{path}: not an ircan neurons file (its 'format' is not '{NEURONS_FORMAT}')")
    ranking = doc.get("ranking")
    if not isinstance(ranking, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), int) and r[k] >= 0 for k in ("layer", "neuron"))
            for r in ranking):
        raise DataError(f"{path}: 'ranking' must be a list of {{'layer': int, 'neuron': int, ...}} entries")
    return doc
