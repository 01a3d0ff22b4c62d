"""Scores reach the right choice: the one function that reads vLLM's private request-id format, and a
tripwire on the vLLM source lines that make that format, so a vLLM upgrade that changes it fails here
rather than mislabelling choices."""

from __future__ import annotations

import inspect

import pytest

from vllm_plasticity.readout_routes import choice_index


def test_vllm_still_builds_request_ids_the_way_choice_index_reads_them():
    from vllm.entrypoints.openai.completion import serving
    from vllm.v1.engine import input_processor, parallel_sampling

    assert 'f"{request_id}-{i}"' in inspect.getsource(serving)  # one request per prompt
    assert 'f"{index}_{self.request_id}"' in inspect.getsource(parallel_sampling)  # n > 1 children
    assert 'f"{request.external_req_id}-{random_uuid():.8}"' in inspect.getsource(input_processor)  # suffix


@pytest.mark.parametrize("req_id, n, completions, choice", [
    ("cmpl-9f2c-0-1a2b3c4d", 1, True, 0),
    ("cmpl-9f2c-1-1a2b3c4d", 1, True, 1),
    ("1_cmpl-9f2c-0-1a2b3c4d", 2, True, 1),
    ("1_cmpl-9f2c-2-1a2b3c4d", 2, True, 5),
    ("chatcmpl-77aa-1a2b3c4d", 1, False, 0),
    ("2_chatcmpl-77aa-1a2b3c4d", 3, False, 2),
])
def test_choice_index(req_id, n, completions, choice):
    assert choice_index(req_id, n, completions) == choice


def test_an_id_in_another_format_is_refused_loudly():
    with pytest.raises(ValueError, match="format changed"):
        choice_index("cmpl-9f2c", 1, completions=True)
