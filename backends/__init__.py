"""llmc's backends (installed as `llmc.backends`). The eager torch backend is the Program itself."""
