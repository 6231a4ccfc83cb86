"""Calibration machinery shared by every pass that calibrates or tunes, one implementation each.

- `blocks`: the decode step cut into its decoder blocks and head, for calibration streamed block
  by block over stored hidden states (`split_blocks`, `split_head`, `block_inputs`, `decode_inputs`).
- `grams`: XᵀX of chosen nodes' inputs, over the whole graph or one layer at a time
  (`GramRecorder`, `input_grams`, `stream_grams`), and the output error a weight approximation
  causes under them (`output_error`, `relative_output_error`).
- `teacher`: the distillation teacher of a graph and the KL to it (`graph_teacher`, `kl_to_teacher`), and
  bfloat16 autocast where the CPU runs it natively (`native_bf16`, `autocast`).
- `checkpoint`: fingerprints of what a result depends on, and checkpoints written atomically and
  read back only under the same fingerprint (`fingerprint`, `save_checkpoint`, `load_checkpoint`,
  `cache_path`, `cached_tensors`, `read_cached`).
"""

from llmc.calibration.blocks import Block, block_inputs, decode_inputs, flat_inputs, split_blocks, split_head
from llmc.calibration.checkpoint import (cache_path, cached_tensors, fingerprint, graph_fingerprint, load_checkpoint,
                                         read_cached, save_checkpoint)
from llmc.calibration.grams import GramRecorder, input_grams, output_error, relative_output_error, stream_grams
from llmc.calibration.teacher import autocast, graph_teacher, kl_to_teacher, native_bf16

__all__ = ["Block", "block_inputs", "decode_inputs", "flat_inputs", "split_blocks", "split_head", "cache_path",
           "cached_tensors", "read_cached", "fingerprint", "graph_fingerprint", "load_checkpoint", "save_checkpoint",
           "GramRecorder", "input_grams", "output_error", "relative_output_error", "stream_grams", "graph_teacher",
           "kl_to_teacher", "native_bf16", "autocast"]
