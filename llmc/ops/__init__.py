"""Custom ops (`llmc::*`): the contract between passes and backends. Importing this registers them."""

from llmc.ops import nbits_linear  # noqa: F401  (registers llmc::nbits_linear)
from llmc.ops import cq  # noqa: F401  (registers llmc::cq_encode, llmc::cq_decode, llmc::cq_attention)
from llmc.ops import vq  # noqa: F401  (registers llmc::vq_linear)
from llmc.ops import kivi  # noqa: F401  (registers llmc::kivi_append)
from llmc.ops import binary_bases  # noqa: F401  (llmc::binary_bases_linear, llmc::binary_bases_linear_outliers)
from llmc.ops import attention  # noqa: F401  (registers llmc::cached_attention)
