"""Imports run one way (DESIGN.md, "The import graph"): the plugin never imports the training side; the
contract imports neither side nor vLLM; the trainer process sees the plugin only through the contract and
the project architectures' torch forms (which import no vLLM: only their *_vllm / recurrent_* modules do).
Read from every module's source (lazy imports inside functions included), so a new file joins by itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN, TRAINING = REPO / "plugin" / "vllm_plasticity", REPO / "training" / "plasticity_training"
TRAINER_PROCESS = ("trainer", "trainer_core", "hf_view", "checkpoint", "checkpoint_io", "checkpoint_layout", "checkpoint_paths",
                   "checkpoint_changes", "checkpoint_tensors", "checkpoint_errors", "apollo")
ARCHITECTURES = PLUGIN / "architectures"
VLLM_PLUMBING = ("recurrent_layer", "recurrent_config", "recurrent_metadata")  # the architectures' vLLM side, beside every <arch>_vllm.py


def vllm_side(stem: str) -> bool:
    return stem.endswith("_vllm") or stem in VLLM_PLUMBING


def torch_form(name: str) -> bool:
    """An architecture module the trainer may import: under vllm_plasticity.architectures, not a vLLM form."""
    return name.startswith("vllm_plasticity.architectures") and not vllm_side(name.rsplit(".", 1)[-1])


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(root: Path) -> dict[str, set[str]]:
    return {str(p.relative_to(root.parent)): imports(p) for p in root.rglob("*.py")}


def wrong(graph: dict[str, set[str]], bad) -> list[tuple[str, str]]:
    return sorted((module, name) for module, names in graph.items() for name in names if bad(name))


def test_the_plugin_never_imports_the_training_side():
    graph = modules(PLUGIN)
    assert len(graph) > 10
    assert wrong(graph, lambda n: n.split(".")[0] == "plasticity_training") == []


def test_the_contract_imports_neither_side_nor_vllm():
    graph = modules(PLUGIN / "contract")
    assert {"contract/messages.py", "contract/weights.py"} <= set(graph)
    bad = lambda n: (n.split(".")[0] in ("vllm", "plasticity_training")
                     or (n.startswith("vllm_plasticity") and not n.startswith("vllm_plasticity.contract")))
    assert wrong(graph, bad) == []


def test_the_trainer_process_sees_the_plugin_only_through_the_contract():
    graph = {m: names for m, names in modules(TRAINING).items() if Path(m).stem in TRAINER_PROCESS}
    assert len(graph) == len(TRAINER_PROCESS)
    bad = lambda n: n.split(".")[0] == "vllm" or (n.startswith("vllm_plasticity") and not n.startswith("vllm_plasticity.contract")
                                                  and not torch_form(n))
    assert wrong(graph, bad) == []


def test_the_architectures_torch_forms_import_no_vllm():
    graph = {m: names for m, names in modules(ARCHITECTURES).items() if not vllm_side(Path(m).stem)}
    assert {"architectures/causal_bank_hf.py", "architectures/causal_bank_modules.py"} <= set(graph)
    bad = lambda n: n.split(".")[0] in ("vllm", "plasticity_training") or (
        n.startswith("vllm_plasticity") and not (n.startswith("vllm_plasticity.contract") or torch_form(n)))
    assert wrong(graph, bad) == []
    code = ("import sys, vllm_plasticity.architectures.causal_bank_hf; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'plasticity_training'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_contract_loads_no_vllm():
    code = ("import sys, vllm_plasticity.contract.messages, vllm_plasticity.contract.weights, "
            "vllm_plasticity.contract.bank, vllm_plasticity.contract.settings, vllm_plasticity.contract.files; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'plasticity_training'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
