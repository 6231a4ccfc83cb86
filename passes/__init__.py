"""llmc's graph passes (installed as `llmc.passes`). Importing this package registers them all."""

from llmc.passes.cq_kv import CoupledKVQuant, UniformKVQuant
from llmc.passes.fold_norm_scales import FoldNormScales
from llmc.passes.gptq_quant import GPTQQuant
from llmc.passes.int8_activations import Int8Activations
from llmc.passes.pv_quant import PVQuant
from llmc.passes.rtn_quant import RTNQuant
from llmc.passes.structured_ffn import StructuredFFN

__all__ = ["CoupledKVQuant", "UniformKVQuant", "FoldNormScales", "PVQuant", "GPTQQuant", "Int8Activations", "RTNQuant", "StructuredFFN"]
