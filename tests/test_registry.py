"""Passes and backends are found by name through entry points, llmc's own and other packages' alike."""

import os
import shutil
import subprocess
import sys

import pytest

import llmc
from llmc.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


def test_builtin_passes_and_backends_come_from_entry_points():
    import importlib.metadata as md

    passes = {ep.name for ep in md.entry_points(group="llmc.passes")}
    assert {"pv_quant", "gptq_quant", "rtn_quant", "structured_ffn", "cq_kv", "uniform_kv", "ircan"} <= passes
    assert set(llmc.registered_passes()) >= passes
    assert {"torch", "onnxruntime"} <= set(llmc.available_backends())
    assert llmc.get_backend("onnxruntime").name == "onnxruntime"


def test_the_core_does_not_import_passes_or_backends():
    code = ("import sys, llmc; llmc.parse_pass_spec('rtn_quant:bits=4'); "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['llmc', 'passes'], ['llmc', 'backends'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # only the asked-for pass (and its package parents) is imported; no backend at all
    assert out.strip() == "['llmc.passes', 'llmc.passes.rtn_quant']"


def test_unknown_names_say_what_exists():
    with pytest.raises(ConfigError, match=r"unknown pass 'rtn_qant' \(did you mean 'rtn_quant'\?\)"):
        llmc.parse_pass_spec("rtn_qant:bits=4")
    with pytest.raises(ConfigError, match=r"unknown backend 'onnxrt'.*available: .*onnxruntime"):
        llmc.get_backend("onnxrt")
    with pytest.raises(ConfigError, match=r"backend 'onnxruntime' has no option 'vq_lowerin' \(did you mean"):
        llmc.get_backend("onnxruntime").options({"vq_lowerin": "kernel"})
    with pytest.raises(ConfigError, match="onnxruntime.vq_lowering"):
        llmc.get_backend("onnxruntime").options({"vq_lowering": "fast"})
    assert llmc.get_backend("onnxruntime").options({"parity": "false"}).parity is False


@pytest.fixture
def plugin_path(tmp_path):
    """The example package as pip would install it: the module and a dist-info with its entry points."""
    shutil.copytree(os.path.join(HERE, "plugin_example", "llmc_example_plugin"), tmp_path / "llmc_example_plugin")
    info = tmp_path / "llmc_example_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llmc-example-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[llmc.passes]\nscale_lm_head = llmc_example_plugin:ScaleLMHead\n\n"
        "[llmc.backends]\nmarked_torch = llmc_example_plugin:MarkedTorch\n")
    return str(tmp_path)


def _run(plugin_path, *args, code=None):
    env = dict(os.environ, PYTHONPATH=plugin_path)
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "llmc.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_an_outside_package_adds_a_pass_and_a_backend(plugin_path, tmp_path):
    listed = _run(plugin_path, "passes")
    assert listed.returncode == 0, listed.stderr
    assert "scale_lm_head: Multiply the lm_head weight by `factor`" in listed.stdout
    backends = _run(plugin_path, "backends")
    assert "marked_torch: The torch folder plus a MARK file" in backends.stdout
    assert "mark (str, default 'example')" in backends.stdout
    out = tmp_path / "compiled"
    code = f"""
import torch, llmc
from llmc.testing import tiny_model, tiny_tokenizer
model = tiny_model("llama")
plain = llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)
cm = llmc.compile(model, passes=["scale_lm_head:factor=3"], tokenizer=tiny_tokenizer(), progress=False,
                  backend="marked_torch", out={str(out)!r}, backend_options={{"mark": "three"}})
ids = torch.tensor([[5, 6, 7]])
torch.testing.assert_close(cm(ids)[0], 3 * plain(ids)[0], rtol=1e-4, atol=1e-4)
again = llmc.load({str(out)!r})
torch.testing.assert_close(again(ids)[0], cm(ids)[0])
print(open({str(out / "MARK")!r}).read(), again.program.history[0].spec)
"""
    run = _run(plugin_path, code=code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["three", "scale_lm_head:factor=3.0"]
