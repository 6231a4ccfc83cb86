"""fuse_guidance: a small tuned / untuned pair as one scorer graph, or fused with a base model (EFT).
The pass is `FuseGuidance` (pass_.py); `fuse_scorer` / `fuse_eft` build the same Programs from models."""

from llmc.passes.fuse_guidance.pass_ import FuseGuidance, as_program, fuse_eft, fuse_scorer, same_vocabulary

__all__ = ["FuseGuidance", "fuse_scorer", "fuse_eft", "as_program", "same_vocabulary"]
