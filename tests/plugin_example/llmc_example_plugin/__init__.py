"""A package outside llmc that adds a pass and a backend through entry points (see tests/test_registry.py).

Its metadata declares (as a pyproject.toml would):

    [project.entry-points."llmc.passes"]
    scale_lm_head = "llmc_example_plugin:ScaleLMHead"
    [project.entry-points."llmc.backends"]
    marked_torch = "llmc_example_plugin:MarkedTorch"
"""

import os
from dataclasses import dataclass

from llmc.backend import Backend
from llmc.compiled import CompiledModel, load
from llmc.graph import get_attr_tensor, module_fqn, set_attr_tensor
from llmc.passes_base import Pass, PassResult, register_pass


@register_pass("scale_lm_head")
@dataclass(frozen=True)
class ScaleLMHead(Pass):
    """Multiply the lm_head weight by `factor` (so every logit is scaled by it)."""

    factor: float = 2.0

    def run(self, gm, ctx):
        heads = [n for n in gm.graph.nodes if n.op == "call_function" and module_fqn(n) == "lm_head"
                 and n.args[1].op == "get_attr"]
        for n in heads:
            set_attr_tensor(gm, n.args[1].target, get_attr_tensor(gm, n.args[1]) * self.factor)
        return PassResult(gm, bool(heads), {"scaled": len(heads)})


@dataclass(frozen=True)
class MarkedOptions:
    mark: str = "example"


class MarkedTorch(Backend):
    """The torch folder plus a MARK file naming the backend that wrote it."""

    name = "marked_torch"
    Options = MarkedOptions

    def lower(self, program, out_dir, options=None, overwrite=False):
        opts = self.options(options)
        path = CompiledModel(program).save(out_dir, overwrite=overwrite)
        with open(os.path.join(path, "MARK"), "w") as f:
            f.write(opts.mark)
        return path

    def load(self, folder):
        return load(folder)

    def owns(self, folder):
        return os.path.isfile(os.path.join(folder, "MARK"))
