"""ONNX Runtime backend: export, parity, runtime, refusals, CLI."""

import json
import os

import pytest
import torch

import llmc
from llmc.backends.onnxruntime import lower, unsupported_ops
from llmc.errors import ExportError, ParityError, UnsupportedOpError
from llmc.backends.onnxruntime import OrtModel
from llmc.testing import TINY_ARCHITECTURES, tiny_tokenizer

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_export_decodes_like_torch(arch, tiny_models, tmp_path):
    cm = llmc.compile(tiny_models[arch], tokenizer=tiny_tokenizer())
    out = lower(cm.program, tmp_path / arch)
    parity = json.load(open(os.path.join(out, "llmc_onnx.json")))["parity"]
    assert parity["greedy_identical"] and parity["logits_max_abs_diff"] < 1e-4
    ort_model = OrtModel(out)
    assert ort_model.generate(PROMPTS, 20, return_tokens=True) == cm.generate(PROMPTS, 20, return_tokens=True)
    ids = torch.randint(3, 256, (2, 5))
    torch.testing.assert_close(ort_model(ids)[0], cm(ids)[0], atol=1e-4, rtol=1e-4)
    last, _ = ort_model.prefill_step(ids, torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5),
                                     ort_model.empty_cache(2))
    assert last.shape == (2, 1, 256)
    torch.testing.assert_close(last, cm(ids)[0][:, -1:], atol=1e-4, rtol=1e-4)


def test_folder_contents_and_io_names(tiny_compiled, tmp_path):
    import onnx

    out = lower(tiny_compiled.program, tmp_path / "m")
    assert sorted(os.listdir(out)) == sorted(["model.onnx", "model.onnx.data", "model_prefill.onnx", "config.json",
                                              "genai_config.json", "llmc_onnx.json", "llmc_byte_tokenizer.json",
                                              "checksums.json"])
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                          "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    dims = [d.dim_param for d in model.graph.input[3].type.tensor_type.shape.dim]
    assert dims[0] == "batch_size" and dims[2] == "past_sequence_length"
    assert {p.key for p in model.metadata_props} >= {"llmc.history"}
    genai = json.load(open(os.path.join(out, "genai_config.json")))
    assert genai["model"]["decoder"]["num_hidden_layers"] == 2 and genai["model"]["decoder"]["head_size"] == 16


def test_history_goes_into_the_export(tiny_models, tmp_path):
    import onnx

    cm = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales"], tokenizer=tiny_tokenizer())
    out = lower(cm.program, tmp_path / "f")
    model = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    history = json.loads({p.key: p.value for p in model.metadata_props}["llmc.history"])
    assert history[0]["name"] == "fold_norm_scales"


def test_existing_folder_refused_and_failed_parity_leaves_nothing(tiny_compiled, tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        lower(tiny_compiled.program, tmp_path / "taken")
    import llmc.backends.onnxruntime.runtime as runtime

    real_step = runtime.OrtModel.step

    def corrupted(self, *args):
        logits, present = real_step(self, *args)
        return logits + 0.5, present

    monkeypatch.setattr(runtime.OrtModel, "step", corrupted)
    with pytest.raises(ParityError, match="differ from torch by 0.5"):
        lower(tiny_compiled.program, tmp_path / "bad")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    lower(tiny_compiled.program, tmp_path / "unchecked", parity=False)  # the user may opt out
    assert json.load(open(tmp_path / "unchecked" / "llmc_onnx.json"))["parity"] is None


def test_unsupported_custom_op_is_named_before_writing(tiny_models, tmp_path):
    cm = llmc.compile(tiny_models["llama"], tokenizer=tiny_tokenizer())
    gm = cm.program.gm
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default)
    assert unsupported_ops(gm) == []
    # an op in the llmc namespace without a translation
    lib = torch.library.Library("llmc", "FRAGMENT")
    lib.define("untranslated_test_op(Tensor x) -> Tensor")
    lib.impl("untranslated_test_op", lambda x: x, "CompositeExplicitAutograd")
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(torch.ops.llmc.untranslated_test_op.default, (node,))
    node.replace_all_uses_with(new)
    new.args = (node,)  # replace_all_uses_with also rewired the new node's own input
    gm.recompile()
    with pytest.raises(UnsupportedOpError, match="llmc.untranslated_test_op.default"):
        lower(cm.program, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_compile_eval_generate_inspect(hf_folder, text_file, tmp_path, capsys):
    from llmc.cli import main

    out = str(tmp_path / "onnx")
    assert main(["compile", hf_folder, "--backend", "onnxruntime", "-o", out]) == 0
    capsys.readouterr()
    assert main(["eval", "ppl", out, "--data", text_file, "--protocol", "ppl-64x2", "--json"]) == 0
    ort_ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert main(["eval", "ppl", hf_folder, "--data", text_file, "--protocol", "ppl-64x2", "--json"]) == 0
    torch_ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert abs(ort_ppl - torch_ppl) < 1e-3 * torch_ppl
    assert main(["generate", out, "Hello", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    assert main(["inspect", out]) == 0
    assert "model.onnx.data" in capsys.readouterr().out
    assert main(["compile", hf_folder, "--backend", "tensorrt", "-o", str(tmp_path / "t")]) == 2
