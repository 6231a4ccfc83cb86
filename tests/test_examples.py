"""Every example runs (on a tiny model, with a small text file)."""

import json
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart(hf_folder, text_file, tmp_path, capsys, monkeypatch):
    argv = ["quickstart.py", "--model", hf_folder, "--out", str(tmp_path / "out"), "--protocol", "ppl-64x2",
            "--data", text_file]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["history"][0]["name"] == "fold_norm_scales"
    assert report["perplexity"]["windows"] == 2 and report["perplexity"]["ppl"] > 1
    assert (tmp_path / "out" / "manifest.json").exists() and (tmp_path / "out-onnx" / "model.onnx").exists()
    assert abs(report["onnxruntime_perplexity"]["ppl"] - report["perplexity"]["ppl"]) < 1e-3 * report["perplexity"]["ppl"]
