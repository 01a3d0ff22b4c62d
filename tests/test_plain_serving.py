"""`plasticity serve` without --training serves with vLLM's own kernels (its CPU GEMM dispatch packs the
weights), so serving speed equals stock vLLM's; only a server that shares its weights keeps them in place.
(Speed itself is measured side by side in research/bench_serving.py, not timed here.)"""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import SERVER_ARGS, prompt_logprobs
from vllm_plasticity.launcher import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]  # a server of its own


def spec_parameters(model_dir) -> int:
    """The parameter count the built-in model's builder recorded (counted from its HF module)."""
    return json.loads((model_dir / "plasticity_spec.json").read_text())["parameters"]


def test_a_server_without_training_uses_vllms_kernels_and_matches_stock(servers_restart, stock_reference,
                                                                        default_model, probe_token_ids, tmp_path):
    server = servers_restart.start("plain", lambda log_path: ServerProcess.plasticity(
        default_model, extra_args=[*SERVER_ARGS, "--state-dir", str(tmp_path)], log_path=log_path))
    try:
        info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        assert info["plasticity_architecture"] is True
        assert info["weights_in_place"] is False and info["weights_shareable"] is False
        # The model's size, though vLLM's packed CPU layers leave the worker's weight tensors empty.
        assert info["num_parameters"] == spec_parameters(default_model)
        for ids, expected in zip(probe_token_ids, stock_reference["prompt_logprobs"]):
            got = prompt_logprobs(server.url, str(default_model), ids)
            assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-5
    finally:
        servers_restart.stop()
