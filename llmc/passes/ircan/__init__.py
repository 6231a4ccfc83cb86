"""ircan: find context-aware FFN neurons by integrated gradients and scale their down_proj columns by β.

IRCAN (Shi et al., arXiv 2406.18406). Attribution (`attribution.py`) scores every FFN neuron of every
layer on each example; selection (`select.py`) keeps per example the scores >= `ratio` x its maximum,
at most `top`, counts the (layer, neuron) pairs over the examples and keeps the `h` most frequent;
their `down_proj` weight columns are multiplied by `beta` in the weights, so the change survives every
later pass and the export. See docs/passes/ircan.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field

from torch import fx

from llmc.calibration import fingerprint, load_checkpoint, save_checkpoint
from llmc.context_tasks import TASKS, Example, answer_token, encode, load_examples, task_file
from llmc.errors import ConfigError, DataError, PassError
from llmc.fsutil import atomic_file
from llmc.graph import get_attr_tensor, graph_digest
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
        if self.neurons is None and (self.h is None or self.beta is None):
            raise ConfigError("ircan needs h= and beta= (the grid search of h and beta on dev is not implemented "
                              "yet), e.g. ircan:task=memotrap,h=14,beta=3")
        _check_int("h", self.h, 1, allow_none=True)
        _check_int("samples", self.samples, 0)
        _check_int("steps", self.steps, 1)
        _check_int("top", self.top, 1)
        if self.beta is not None and (not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool)
                                      or not math.isfinite(self.beta) or self.beta < 0):
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
                raise ConfigError(f"ircan: {self.neurons} holds no h/beta; pass h= and beta=")
            IRCAN(neurons=self.neurons, h=h, beta=beta)  # the file's values pass the same checks as options
            ranking, out_path = doc["ranking"], None
            source = {"neurons": os.path.abspath(os.path.expanduser(self.neurons))}
        else:
            h, beta = self.h, self.beta
            doc = self._mine(gm, ctx, program)
            ranking = doc["ranking"]
            doc.update(h=h, beta=beta)
            out_path = self._write(doc, ctx)
            source = {"data": doc["data"], "examples": len(doc["examples"])}
        selected = [(int(r["layer"]), int(r["neuron"])) for r in ranking[:h]]
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
