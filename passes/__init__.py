"""llmc's graph passes (installed as `llmc.passes`). Importing this package registers them all."""

from llmc.passes.fold_norm_scales import FoldNormScales

__all__ = ["FoldNormScales"]
