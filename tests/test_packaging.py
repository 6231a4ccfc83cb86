"""The installed layout: one import namespace."""

import importlib
import subprocess
import sys


def test_passes_and_backends_live_under_llmc():
    assert importlib.import_module("llmc.passes.fold_norm_scales").FoldNormScales.name == "fold_norm_scales"
    assert importlib.import_module("llmc.passes.pv_quant").PVQuant.name == "pv_quant"
    importlib.import_module("llmc.backends.onnxruntime")


def test_nothing_else_is_importable_at_top_level(tmp_path):
    code = "import importlib.util as u; print(u.find_spec('passes'), u.find_spec('backends'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"
