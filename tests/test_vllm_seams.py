"""The tripwire on vLLM's internals: every seam the plugin relies on (vllm_plasticity/vllm_seams.py) holds in the
installed vLLM's source, a vLLM file changed where the plugin relies on it fails its seam with what changed,
every name the plugin imports from vLLM is a listed seam, and DESIGN.md's list is the module's.

Reads vLLM's source with `ast` only (no vLLM import, no server), so it runs in the quick tier."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_plasticity.vllm_seams import SEAMS, TOUCHES, check, render_markdown
from vllm_plasticity.vllm_source import VllmSource

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "vllm_plasticity"
VLLM = Path(importlib.util.find_spec("vllm").submodule_search_locations[0])  # found, not imported
SEAM = {seam.name: seam for seam in SEAMS}


@pytest.fixture(scope="module")
def installed() -> VllmSource:
    return VllmSource(VLLM)


@pytest.mark.parametrize("seam", SEAMS, ids=[seam.name for seam in SEAMS])
def test_every_seam_holds_in_the_installed_vllm(seam, installed):
    assert check(seam, installed) == []


def with_changed_file(tmp_path: Path, rel: str, old: str, new: str):
    """The installed vLLM, except `rel`: a copy in `tmp_path` with `old` replaced by `new`."""
    text = (VLLM / rel).read_text()
    assert old in text, f"{rel} no longer contains {old!r}: update this test"
    copy = tmp_path / "vllm" / rel
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text.replace(old, new))

    def read(path: str) -> str | None:
        for root in (tmp_path / "vllm", VLLM):
            if (root / path).is_file():
                return (root / path).read_text()
        return None
    return read


@pytest.mark.parametrize("seam, rel, old, new, expected", [
    ("engine core add_request_async", "v1/engine/core_client.py",
     "    async def add_request_async(self, request: EngineCoreRequest) -> None:\n        request.client_index",
     "    async def add_request_async(self, req: EngineCoreRequest) -> None:\n        req.client_index",
     "AsyncMPClient.add_request_async has no parameter request"),
    ("runner _model_forward", "v1/worker/gpu_model_runner.py",
     "model_output = self._model_forward(", "model_output = self._run_model(",
     "GPUModelRunner.execute_model no longer uses _model_forward"),
    ("request-id format: parallel sampling", "v1/engine/parallel_sampling.py",
     'f"{index}_{self.request_id}"', 'f"{self.request_id}:{index}"', "no longer contains"),
    ("Mamba metadata fields", "v1/attention/backends/mamba_attn.py",
     "    state_indices_tensor_d: torch.Tensor | None", "    decode_state_indices: torch.Tensor | None",
     "BaseMambaAttentionMetadata no longer defines state_indices_tensor_d"),
    ("Qwen2 decoder layer class", "model_executor/models/qwen2.py",
     "        positions: torch.Tensor,\n        hidden_states: torch.Tensor,\n        residual: torch.Tensor | None,\n"
     "    ) -> tuple[torch.Tensor, torch.Tensor]:",
     "        hidden_states: torch.Tensor,\n        positions: torch.Tensor,\n        residual: torch.Tensor | None,\n"
     "    ) -> tuple[torch.Tensor, torch.Tensor]:",
     "takes (hidden_states, positions, residual)"),
])
def test_a_changed_vllm_file_breaks_its_seam_with_what_changed(tmp_path, seam, rel, old, new, expected):
    problems = check(SEAM[seam], with_changed_file(tmp_path, rel, old, new))
    assert any(expected in p for p in problems), problems
    assert check(SEAM[seam], VLLM) == []  # the installed file itself still holds


def test_a_class_that_moved_is_found_in_a_vllm_directory(tmp_path):
    """On a directory (an unpacked wheel) a target that left its module is looked for elsewhere."""
    root = tmp_path / "vllm"
    (root / "v1" / "engine").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "v1" / "engine" / "core_client.py").write_text("class MPClient:\n    pass\n")
    (root / "v1" / "engine" / "async_client.py").write_text(
        "class AsyncMPClient:\n    async def add_request_async(self, request):\n        pass\n")
    assert check(SEAM["engine core add_request_async"], root) == [
        "no AsyncMPClient in vllm.v1.engine.core_client (now in vllm.v1.engine.async_client)"]
    assert check(SEAM["request-id format: engine suffix"], root) == [
        "no module vllm.v1.engine.input_processor (defined nowhere in this tree)"]


def test_every_name_the_plugin_imports_from_vllm_is_a_seam(installed):
    """A new `from vllm... import X` in the plugin fails here until vllm_seams.py lists it (names are
    compared where vLLM defines them, so a re-export counts as its definition)."""
    covered = set()
    for seam in SEAMS:
        head = seam.target.partition(".")[0]
        hit = installed.definition(seam.module, head) if head else None
        # `(module, "")`: a whole-module import (`from vllm import _custom_ops`) is covered by any seam in it
        covered |= {(hit[0], head) if hit else (seam.module, head), (seam.module, "")}
        covered |= {(seam.module, text) for text in seam.contains}
    missing = []
    for path in sorted(PLUGIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm"):
                continue
            for alias in node.names:
                hit = installed.definition(node.module, alias.name)
                key = (hit[0], "" if isinstance(hit[1], ast.Module) else alias.name) if hit else None
                lazy = any(m == node.module and f'"{alias.name}"' in text for m, text in covered)  # vllm's lazy exports
                if key not in covered and not lazy:
                    missing.append(f"{path.relative_to(PLUGIN)}: from {node.module} import {alias.name}")
    assert missing == []


def test_each_seam_names_a_known_touch_and_an_existing_plugin_file():
    assert len({seam.name for seam in SEAMS}) == len(SEAMS)
    for seam in SEAMS:
        assert seam.touch in TOUCHES, seam.name
        for used in seam.used_by.split(", "):
            assert (PLUGIN / used).exists(), f"{seam.name}: {used}"


def test_design_md_lists_the_seams_as_vllm_seams_renders_them():
    design = (REPO / "DESIGN.md").read_text()
    assert render_markdown() in design, ("DESIGN.md's list of vLLM seams differs from vllm_seams.render_markdown(): "
                                         "paste its output over the list")


def test_the_seam_check_imports_no_vllm():
    code = ("import sys; from vllm_plasticity.vllm_seams import check_all; "
            f"assert not any(check_all({str(VLLM)!r}).values()); "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
