"""Pass infrastructure: the Pass contract, its context and result, the registry and the PassManager.

A pass is a frozen dataclass whose fields are its configuration; `run(gm, ctx)` rewrites the
GraphModule in place and returns a PassResult. Passes declare facts they `requires`, `provides`
and `invalidates` (e.g. "dense_linear_weights"); the PassManager checks a pipeline against them
before anything runs and names the pass that would fix a bad order.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx

from llmc.errors import ConfigError, LlmcError, PassError, PassOrderError, did_you_mean
from llmc.progress import log
from llmc.registry import PASSES

# Facts true of a freshly traced Program.
INITIAL_FACTS = frozenset({"dense_linear_weights", "float_kv_cache"})
# Facts a PassContext can supply: what the user passed to compile().
CONTEXT_FACTS = {"calibration": "calibration data (compile(..., calibration=...) or --calib)",
                 "teacher": "a teacher model (the FP program is used by default)"}


@dataclass
class PassResult:
    """What a pass did: the (rewritten) GraphModule, whether anything changed, and its statistics.

    cache_layout: the new KV-cache layout when the pass changed what the cache holds (the graph's
    past/present tensors); None when it left the cache alone. The PassManager installs it.
    """

    gm: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)
    cache_layout: list | None = None


@dataclass
class PassContext:
    """What a pass may use besides the graph.

    calibration: token batches (LongTensor [B, S] each) for calibrating passes.
    teacher: a callable `(input_ids, attention_mask) -> logits` of the FP model, for distillation.
    program: the Program being compiled (config, cache layout, tokenizer, linear shapes).
    """

    calibration: list | None = None
    teacher: typing.Callable | None = None
    program: typing.Any = None
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    dump_dir: str | None = None

    def require_calibration(self, pass_name: str) -> list:
        """The calibration batches, or a ConfigError saying how to provide them."""
        if not self.calibration:
            raise ConfigError(f"{pass_name} needs calibration data: pass compile(..., calibration='wikitext2-valid') "
                              "or --calib")
        if self.program is None:
            raise PassError(f"{pass_name} needs the Program (its cache layout) in the pass context; run it through "
                            "llmc.compile or a PassManager")
        return self.calibration

    def facts(self) -> set[str]:
        out = set()
        if self.calibration:
            out.add("calibration")
        if self.teacher is not None:
            out.add("teacher")
        return out


class Pass:
    """Base class of graph passes. Subclasses are frozen dataclasses registered with @register_pass.

    Class attributes:
        name: registry name (snake_case), set by @register_pass.
        requires / provides / invalidates: facts checked by the PassManager before running.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def config_dict(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The string spec that rebuilds this pass: `name:key=value,...` (non-default fields only)."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if v != default:
                parts.append(f"{f.name}={_format_value(v)}")
        return self.name + (":" + ",".join(parts) if parts else "")


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _format_value(v) -> str:
    if isinstance(v, tuple):
        return "+".join(str(x) for x in v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def register_pass(name: str):
    """Class decorator: name a Pass subclass `name` (its spec and history name) and register it in
    this process. Installed passes are found through their `llmc.passes` entry point, whose name
    must be the same."""

    def deco(cls):
        cls.name = name
        PASSES.register(name, cls)
        return cls

    return deco


def pass_class(name: str) -> type[Pass]:
    """The pass class registered as `name` (loading its entry point); ConfigError when there is none."""
    cls = PASSES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise LlmcError(f"the entry point of pass '{name}' is {cls!r}, not a Pass subclass")
    if cls.name != name:
        raise LlmcError(f"pass '{name}' is the class {cls.__qualname__}, whose name is '{cls.name}': an entry "
                        "point's name and its class's @register_pass name must agree")
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass by name: llmc's own, those of other installed packages, those registered here."""
    return {name: pass_class(name) for name in PASSES.names()}


def pass_options(cls: type[Pass]) -> list[tuple[str, str, object, str]]:
    """(name, type, default, help) of each option of a pass class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, _type_name(hints.get(f.name, str)), default, f.metadata.get("help", "")))
    return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def convert_option(value: str, tp, where: str):
    """`value` (a string from a spec or the command line) as the type `tp` of the option `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return convert_option(value, args[0], where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        (elem, *_) = typing.get_args(tp) or (str,)
        return tuple(convert_option(v, elem, where) for v in value.split("+") if v)
    if tp is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got '{value}'")
    if tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {tp.__name__}, got '{value}'") from None
    return value


def parse_pass_spec(spec: str) -> Pass:
    """Build a pass from `name` or `name:key=value,key=value` (tuples as `a+b`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"empty pass spec {spec!r}; expected name or name:key=value,...")
    name, _, rest = spec.strip().partition(":")
    cls = pass_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"pass spec '{spec}': option '{item}' has no value; write {key}=VALUE")
        if key not in fields:
            raise ConfigError(f"pass '{name}' has no option '{key}'{did_you_mean(key, fields)}; options: {', '.join(sorted(fields)) or 'none'}")
        if key in kwargs:
            raise ConfigError(f"pass spec '{spec}': option '{key}' given twice")
        kwargs[key] = convert_option(value.strip(), hints.get(key, str), f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"pass '{name}': {e}") from e


def as_pass(p) -> Pass:
    """A Pass from a Pass instance or a string spec."""
    if isinstance(p, Pass):
        return p
    if isinstance(p, str):
        return parse_pass_spec(p)
    raise ConfigError(f"a pass must be a Pass or a spec string like 'name:key=value', got {type(p).__name__}")


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB elsewhere


def _providers(fact: str, registry: dict[str, type[Pass]]) -> list[str]:
    return [n for n, c in registry.items() if fact in c.provides]


class PassManager:
    """Runs a pipeline of passes over a Program, after checking their requires/provides order."""

    def __init__(self, passes):
        self.passes = [as_pass(p) for p in passes]

    def check(self, ctx: PassContext | None = None, extra_facts: set[str] = frozenset(),
              initial: frozenset = INITIAL_FACTS) -> None:
        """Raise PassOrderError if some pass lacks a fact, saying which pass (and where) would supply it.

        Facts available at the start: `initial` (a fresh trace), what `ctx` carries, and `extra_facts`.
        """
        facts = set(initial) | set(extra_facts) | (ctx.facts() if ctx is not None else set())
        removed_by: dict[str, str] = {}
        for i, p in enumerate(self.passes):
            for fact in p.requires:
                if fact in facts:
                    continue
                where = f"pass {i + 1} '{p.name}' requires '{fact}'"
                if fact in removed_by:
                    raise PassOrderError(f"{where}, which '{removed_by[fact]}' (earlier in the pipeline) removes: "
                                         f"run '{p.name}' before '{removed_by[fact]}'")
                later = [q.name for q in self.passes[i + 1:] if fact in q.provides]
                if later:
                    raise PassOrderError(f"{where}, which '{later[0]}' provides later in the pipeline: "
                                         f"move '{later[0]}' before '{p.name}'")
                if fact in CONTEXT_FACTS:
                    raise PassOrderError(f"{where}: provide {CONTEXT_FACTS[fact]}")
                providers = _providers(fact, registered_passes())
                fix = f"add '{providers[0]}' before it" if providers else "no registered pass provides it"
                raise PassOrderError(f"{where}, which nothing before it provides: {fix}")
            for fact in p.invalidates:
                facts.discard(fact)
                removed_by[fact] = p.name
            for fact in p.provides:
                facts.add(fact)
                removed_by.pop(fact, None)

    def run(self, program, ctx: PassContext) -> None:
        """Run every pass on `program.gm` in order, recording history. Errors name the failing pass."""
        from llmc.program import PassRecord

        self.check(ctx)
        ctx.program = program
        for i, p in enumerate(self.passes):
            done = ", ".join(q.name for q in self.passes[:i]) or "none"
            log(f"pass {i + 1}/{len(self.passes)}: {p.spec()}")
            t0 = time.perf_counter()
            rss_before = _peak_rss_mb()
            torch.manual_seed(ctx.seed)
            try:
                result = p.run(program.gm, ctx)
                result.gm.graph.lint()
            except LlmcError as e:
                raise type(e)(f"pass '{p.name}' failed (after: {done}): {e}") from e
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed (after: {done}): {type(e).__name__}: {e}") from e
            program.gm = result.gm
            program.gm.recompile()
            if result.cache_layout is not None:
                program.cache_layout = list(result.cache_layout)
            seconds = time.perf_counter() - t0
            # the process's peak resident memory before and after the pass (a pass that needed more memory
            # than everything before it raises the second above the first)
            stats = dict(result.stats, modified=result.modified, peak_rss_mb_before=rss_before,
                         peak_rss_mb=_peak_rss_mb())
            program.history.append(PassRecord(p.name, p.spec(), p.config_dict(), stats, seconds))
