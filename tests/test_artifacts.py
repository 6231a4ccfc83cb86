"""Artifacts users hand back to llmc: checksummed folders (torch and ONNX), NaN logits, the Python API's
inputs, the CLI's help, exit codes and folder permissions, and an offline hub id."""

import json
import os
import stat
import time

import pytest
import torch

import llmc
from llmc.cli import main
from llmc.errors import ArtifactError, ConfigError, ModelLoadError, NumericalError, check_finite
from llmc.eval import perplexity
from llmc.fsutil import CHECKSUMS, verify_folder
from llmc.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def onnx_folder(tiny_compiled, tmp_path_factory):
    from llmc.backends.onnxruntime import lower

    return lower(tiny_compiled.program, tmp_path_factory.mktemp("onnx") / "m")


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / os.path.basename(folder))


def _flip(path, offset=None):
    data = bytearray(open(path, "rb").read())
    i = len(data) // 2 if offset is None else offset
    data[i:i + 64] = bytes(b ^ 0x5A for b in data[i:i + 64])  # same size, different bytes
    open(path, "wb").write(bytes(data))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def test_onnx_folder_is_checksummed(onnx_folder, tmp_path):
    from llmc.backends.onnxruntime import OrtModel

    doc = json.load(open(os.path.join(onnx_folder, CHECKSUMS)))
    assert {"model.onnx", "model.onnx.data", "llmc_onnx.json"} <= set(doc["files"])
    assert verify_folder(onnx_folder) == len(doc["files"])
    flipped = _copy(onnx_folder, tmp_path / "a")
    _flip(os.path.join(flipped, "model.onnx.data"))
    with pytest.raises(ArtifactError, match=r"corrupt: model.onnx.data does not match .*export the model again"):
        OrtModel(flipped)
    truncated = _copy(onnx_folder, tmp_path / "b")
    _truncate(os.path.join(truncated, "model.onnx.data"))
    with pytest.raises(ArtifactError, match=r"model.onnx.data is \d+ bytes, \d+ were written \(truncated\)"):
        llmc.load(truncated)


def test_torch_folder_byte_flip_and_truncation(tiny_compiled, tmp_path):
    out = tiny_compiled.save(tmp_path / "t")
    assert verify_folder(out) >= 4
    _flip(os.path.join(out, "weights.safetensors"))
    with pytest.raises(ArtifactError, match="corrupt: weights.safetensors does not match"):
        llmc.load(out)
    out2 = tiny_compiled.save(tmp_path / "t2")
    _truncate(os.path.join(out2, "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"weights.safetensors is \d+ bytes.*truncated"):
        llmc.load(out2)


def test_verify_command(tiny_compiled, onnx_folder, tmp_path, capsys):
    out = tiny_compiled.save(tmp_path / "t")
    assert main(["verify", out]) == 0
    assert "files match their checksums; opens as a torch model" in capsys.readouterr().out
    assert main(["verify", onnx_folder]) == 0
    assert "opens as a onnxruntime model" in capsys.readouterr().out
    _flip(os.path.join(out, "graph.pt2"))
    assert main(["verify", out]) == 2
    assert "graph.pt2 does not match" in capsys.readouterr().err
    os.remove(os.path.join(out, CHECKSUMS))
    assert main(["verify", out]) == 2
    assert "has no checksums.json" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2


def test_nan_logits_are_an_error(tiny_models, tmp_path):
    import copy

    hf = copy.deepcopy(tiny_models["llama"])  # poisoned below: never the shared one
    with torch.no_grad():
        hf.model.norm.weight[3] = float("nan")
    cm = llmc.compile(hf, tokenizer=tiny_tokenizer(), progress=False)
    with pytest.raises(NumericalError, match="NaN or infinite logits"):
        cm.generate("hello", 3)
    with pytest.raises(NumericalError, match="NaN or infinite logits"):
        perplexity(cm, torch.randint(3, 256, (300,)), "ppl-128x2", progress=False)
    folder = cm.save(tmp_path / "nan")
    assert main(["generate", folder, "hi", "--max-new-tokens", "2"]) == 1
    import numpy as np  # numpy logits (OrtModel.greedy_tokens) are checked the same way

    check_finite(np.zeros((2, 5), np.float32), "a step")
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(NumericalError, match=r"NaN or infinite logits \(a step\)"):
            check_finite(np.array([[0.5, bad, 1.0]], np.float32), "a step")


def test_api_takes_a_pass_string_and_finds_the_tokenizer(tiny_models, hf_folder):
    cm = llmc.compile(tiny_models["llama"], passes="fold_norm_scales", tokenizer=tiny_tokenizer(), progress=False)
    assert [h.spec for h in cm.program.history] == ["fold_norm_scales"]
    assert repr(cm).startswith("<CompiledModel") and "passes: fold_norm_scales" in repr(cm)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(hf_folder)  # a model object: its folder holds the tokenizer
    assert llmc.compile(loaded, progress=False).tokenizer is not None
    bare = llmc.compile(tiny_models["llama"], progress=False)
    with pytest.raises(ConfigError, match="no tokenizer"):
        bare.generate("hi", 2)
    assert len(bare.generate([[5, 6, 7]], 2, return_tokens=True)[0]) == 2


def test_help_shows_choices_defaults_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{auto,kernel,dequantize}" in out and "(default: torch)" in out and "exit status: 0 success; 2 bad input" in out


def test_exit_codes(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing-here"), "hi"]) == 2  # bad input
    assert main(["compile", "smollm2-135m", "--pass", "nosuchpass", "-o", str(tmp_path / "o")]) == 2
    assert main(["eval", "ppl", "x", "--protocol", "ppl-bad"]) == 2
    capsys.readouterr()


def test_folders_follow_the_umask(tiny_compiled, tmp_path):
    old = os.umask(0o022)
    try:
        out = tiny_compiled.save(tmp_path / "perm")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-llmc-cache")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        llmc.load_model("someorg/some-model")
    assert time.perf_counter() - t0 < 2


def test_compile_lowers_a_compiled_folder(tiny_compiled, tmp_path, capsys):
    src = tiny_compiled.save(tmp_path / "src")
    out = tmp_path / "onnx"
    assert main(["compile", src, "--backend", "onnxruntime", "-o", str(out)]) == 0
    capsys.readouterr()
    from llmc.backends.onnxruntime import OrtModel

    ort = OrtModel(str(out))
    ids = torch.randint(3, 256, (1, 6))
    torch.testing.assert_close(ort(ids)[0], tiny_compiled(ids)[0], atol=1e-4, rtol=1e-4)
    again = tmp_path / "again"
    assert main(["compile", str(out), "--backend", "onnxruntime", "-o", str(again)]) == 2
    assert "cannot be lowered again" in capsys.readouterr().err
