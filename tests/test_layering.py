"""The layering of DESIGN.md, as the import-linter contracts in pyproject.toml state it: on the tree
as it is, and on copies of it with one import planted that breaks one contract."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


@pytest.fixture
def tree(tmp_path):
    shutil.copytree(os.path.join(ROOT, "llmc"), tmp_path / "llmc", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    return tmp_path


def lint(tree) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([LINT, "--no-cache", "--config", str(tree / "pyproject.toml")], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def plant(path, line: str) -> None:
    with open(path, "a") as f:
        f.write(f"\n{line}  # planted by the test\n")


@pytest.mark.parametrize("where", ["repository", "copy"])
def test_the_contracts_hold(tree, where):
    out = lint(tree) if where == "copy" else subprocess.run(
        [LINT, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 kept, 0 broken" in out.stdout
    assert "Analyzed" in out.stdout and " 0 files" not in out.stdout


@pytest.mark.parametrize("where, line, contract", [
    ("llmc/passes/gptq_quant.py", "from llmc.passes import rtn_quant",
     "passes are independent of each other"),
    ("llmc/passes/pv_quant/tune.py", "import llmc.passes.structured_ffn.recovery",
     "passes are independent of each other"),
    ("llmc/cli.py", "import llmc.passes.cq_kv", "core and backends never import a pass"),  # cli: no pass imports it
    ("llmc/cli.py", "from llmc.backends.onnxruntime import OrtModel", "core and passes never import a backend"),
    ("llmc/passes/rtn_quant.py", "import llmc.backends.onnxruntime", "core and passes never import a backend"),
    ("llmc/backends/onnxruntime/export.py", "import llmc.passes.rtn_quant", "core and backends never import a pass"),
    ("llmc/ops/vq.py", "import llmc.program", "ops import nothing else of llmc"),
])
def test_a_planted_import_breaks_its_contract(tree, where, line, contract):
    plant(tree / where, line)
    out = lint(tree)
    assert out.returncode != 0
    text = " ".join(out.stdout.split())  # long contract names wrap
    assert f"{contract} BROKEN" in text, out.stdout
    assert text.count("BROKEN") == 1, out.stdout  # only that one
