"""Custom ops (`llmc::*`): the contract between passes and backends. Importing this registers them."""
