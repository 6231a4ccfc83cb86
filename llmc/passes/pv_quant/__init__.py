"""pv_quant: additive vector quantization (AQLM codes) fine-tuned with PV-Tuning.

pass_.py: the pass (its options and the graph rewrite); aq.py: AQLM of one matrix;
representations.py: vector and scalar codes as trainable tensors; calibrate.py: one-shot
calibration streamed block by block; tune.py: PV-Tuning of the whole model.
"""

from llmc.passes.pv_quant.pass_ import PVQuant

__all__ = ["PVQuant"]
