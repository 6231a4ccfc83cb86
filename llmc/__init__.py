"""llmc: a model-transformation compiler for large language models.

    import llmc
    cm = llmc.compile("smollm2-135m", passes=["rtn_quant:bits=4"])
    cm.generate("The capital of France is", max_new_tokens=20)
    ort = llmc.compile("smollm2-135m", passes=["rtn_quant:bits=4"], backend="onnxruntime", out="out/")
    llmc.load("out/").perplexity("wikitext2-test")
"""

from llmc import data, errors
from llmc.api import compile, to_program
from llmc.backend import Backend, available_backends, get_backend, load
from llmc.compiled import CompiledModel
from llmc.errors import LlmcError
from llmc.model import Model
from llmc.models import load_model
from llmc.passes_base import Pass, PassContext, PassManager, PassResult, parse_pass_spec, register_pass, registered_passes
from llmc.program import Program
from llmc.search import SearchSpec, search

__version__ = "0.1.0"

__all__ = ["compile", "to_program", "load", "load_model", "Model", "CompiledModel", "Program", "Pass", "PassContext",
           "PassManager", "PassResult", "register_pass", "registered_passes", "parse_pass_spec", "Backend",
           "get_backend", "available_backends", "LlmcError", "data", "errors", "search", "SearchSpec"]
