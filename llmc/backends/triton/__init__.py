"""Triton backend: a Triton kernel for every llmc op, the graph through torch.compile on CUDA.

    from llmc.backends.triton import TritonModel, lower
    lower(program, "out/triton")        # program/ (graph, compact safetensors weights) + llmc_triton.json
    model = TritonModel("out/triton")   # CUDA; or CPU with TRITON_INTERPRET=1 (Triton's interpreter)

Importing this package needs neither triton nor a GPU (listing backends, writing folders);
running the kernels needs triton, and a CUDA GPU or TRITON_INTERPRET=1.
"""

from llmc.backends.triton.backend import TritonBackend, TritonOptions, lower
from llmc.backends.triton.runtime import TRITON_MANIFEST, TritonModel, is_triton_folder, place_graph

__all__ = ["TritonBackend", "TritonOptions", "TritonModel", "lower", "is_triton_folder", "place_graph",
           "TRITON_MANIFEST"]
