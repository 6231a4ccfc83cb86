"""cq_kv: coupled quantization of the KV cache (CQ). The pass is `CoupledKVQuant` (pass_.py)."""

from llmc.passes.cq_kv.pass_ import CoupledKVQuant, parse_cq_config

__all__ = ["CoupledKVQuant", "parse_cq_config"]
