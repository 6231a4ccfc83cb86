"""qbb_quant: linear weights as sums of scaled binary bases (QBB), run by a summation-only kernel.

pass_.py: the pass (options, stages, the graph rewrite); bases.py: cascaded init, scale refits and
the layer-wise refinement of one matrix; calibrate.py: calibration of the scales through the network.
"""

from llmc.passes.qbb_quant.pass_ import QBBQuant

__all__ = ["QBBQuant"]
