"""Custom ops (`llmc::*`): the contract between passes and backends. Importing this registers them."""

from llmc.ops import nbits_linear  # noqa: F401  (registers llmc::nbits_linear)
