"""llmc: a model-transformation compiler for large language models.

    import llmc
    cm = llmc.compile("smollm2-135m", passes=["fold_norm_scales"])
    cm.generate("The capital of France is", max_new_tokens=20)
    cm.save("out/")
"""

from llmc import data, errors
from llmc.api import compile, to_program
from llmc.compiled import CompiledModel, load
from llmc.errors import LlmcError
from llmc.models import load_model
from llmc.passes_base import Pass, PassContext, PassManager, PassResult, parse_pass_spec, register_pass, registered_passes
from llmc.program import Program

__version__ = "0.1.0"

__all__ = ["compile", "to_program", "load", "load_model", "CompiledModel", "Program", "Pass", "PassContext",
           "PassManager", "PassResult", "register_pass", "registered_passes", "parse_pass_spec", "LlmcError",
           "data", "errors"]
