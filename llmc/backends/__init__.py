"""llmc's backends, found by name through the `llmc.backends`
entry points. The eager torch backend is the core's own (llmc.compiled.TorchBackend)."""
