"""llmc's graph passes, one module or package per method.

Passes are found by name through the `llmc.passes` entry points (pyproject.toml); importing this
package imports none of them. A pass never imports another pass: what several share is core code
(`llmc.calibration`, `llmc.rewrite`, `llmc.quantization`, `llmc.kv_cache`).
"""
