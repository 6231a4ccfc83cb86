"""`llmc.compile`: model in, passes run, CompiledModel out."""

from __future__ import annotations

import os
import typing

from torch import nn

from llmc.backend import get_backend
from llmc.compiled import CompiledModel
from llmc.errors import ConfigError
from llmc.models import SourceModel, load_model
from llmc.passes_base import PassContext, PassManager
from llmc.program import Program
from llmc.progress import log
from llmc.trace import trace


def _eos_ids(model: nn.Module) -> tuple[int, ...]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _source(model, tokenizer=None) -> SourceModel:
    if isinstance(model, str):
        return load_model(model, traceable=True)
    if isinstance(model, SourceModel):
        return model
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        if tokenizer is None and name and os.path.isdir(name):  # from_pretrained(folder): its tokenizer is there
            from llmc.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(name)
        return SourceModel(model, tokenizer, name, "")
    raise ConfigError(f"cannot compile a {type(model).__name__}: pass a model spec, llmc.load_model(...) "
                      "or a Hugging Face causal LM")


def to_program(model, tokenizer=None) -> Program:
    """Trace a model (a SourceModel, a spec string for load_model, or an HF causal LM) into a Program."""
    src = _source(model, tokenizer)
    log(f"tracing {src.name} ({src.model.config.model_type})")
    traced = trace(src.model)
    log(f"traced in {traced.seconds:.1f} s")
    return Program.from_traced(traced, src.model.config, tokenizer or src.tokenizer, src.name, src.source,
                               _eos_ids(src.model))


def compile(model, passes: typing.Sequence = (), *, calibration=None, tokenizer=None, backend: str = "torch",
            out: str | None = None, backend_options=None, overwrite: bool = False, seed: int = 0,
            progress: bool = True, dump_dir: str | None = None, teacher=None):
    """Trace `model`, run `passes` (Pass objects or spec strings) and return a runnable Model.

    `model` may also be a Program or a CompiledModel: its passes' history is kept, the graph is not
    traced again, and the passes run on a fork (the given model is left unchanged); the default
    teacher is then that model as it is.

    backend: a registered backend (`llmc backends`): "torch" returns a CompiledModel (saved to
    `out` when given); another backend lowers the program to `out` (required) with
    `backend_options` (its Options, or a dict) and returns the model it loads from there, e.g. an
    OrtModel for "onnxruntime". calibration: a data set name/path (tokenized with the model's
    tokenizer) or a list of LongTensor batches. teacher: `(input_ids, attention_mask) -> logits`;
    by default the source model itself.
    The pipeline order, the backend and its options are checked before anything is loaded or traced.
    """
    if isinstance(passes, str) or not isinstance(passes, typing.Iterable):  # one spec or one Pass
        passes = [passes]
    target = get_backend(backend)
    options = target.options(backend_options)
    if backend != "torch" and out is None:
        raise ConfigError(f"backend '{backend}' writes a folder: pass out='DIR'")
    if out is not None and os.path.exists(out) and not overwrite:
        raise ConfigError(f"{out} already exists; choose another folder or pass overwrite=True")
    manager = PassManager(passes)
    manager.check(extra_facts={"teacher"} | ({"calibration"} if calibration is not None else set()))
    if isinstance(model, (Program, CompiledModel)):  # already traced: run the passes on a fork of it
        program = (model.program if isinstance(model, CompiledModel) else model).fork()
        if tokenizer is not None:
            program.tokenizer = tokenizer
        if teacher is None:
            from llmc.calibration import graph_teacher

            teacher = graph_teacher(program.gm, program.empty_cache)
    else:
        src = _source(model, tokenizer)
        program = to_program(src, tokenizer)
    if teacher is None:
        def teacher(input_ids, attention_mask=None):
            return src.model(input_ids=input_ids, attention_mask=attention_mask).logits
    ctx = PassContext(seed=seed, progress=progress, dump_dir=dump_dir, teacher=teacher)
    if isinstance(calibration, str) or hasattr(calibration, "__fspath__"):
        from llmc.data import calibration_batches

        ctx.calibration = calibration_batches(program.tokenizer, str(calibration), seed=seed)
    elif calibration is not None:
        ctx.calibration = list(calibration)
    manager.run(program, ctx)
    if backend != "torch":  # the backend's own runtime, from the folder it wrote
        return target.load(target.lower(program, out, options, overwrite=overwrite))
    compiled = CompiledModel(program)
    if out is not None:
        compiled.save(out, overwrite=overwrite)
    return compiled
