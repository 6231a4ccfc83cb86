"""structured_ffn: low-rank / block-dense / block-shuffle FFN layers (Wei et al., NeurIPS 2024).

pass_.py: the pass (options, initialisation, graph rewrite); factors.py: the structured maps and
their activation-aware factorisation; local.py: layer-by-layer initialisation; recovery.py:
self-guided recovery training.
"""

from llmc.passes.structured_ffn.pass_ import StructuredFFN

__all__ = ["StructuredFFN"]
