"""/train with preference pairs (DPO, ORPO) and sample weights on a real server: DPO widens the
chosen-minus-rejected margin on the pairs it trained on and on held-out pairs of the same kind, a weight
of 0 changes nothing, every malformed body is refused with nothing changed, and dedup keys name the
objective and both continuations."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import API_KEY, prompt_logprobs

pytestmark = pytest.mark.server
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TRAIN = ["The cat felt", "The old man felt", "My sister felt", "The teacher felt", "Everyone in the room felt",
         "The small dog felt"]
HELD_OUT = ["The neighbour felt", "Her friend felt"]
CHOSEN, REJECTED = " calm and happy", " cold and afraid"
PROBE = "The door of the old house was open and the"


@pytest.fixture(scope="module")
def tok(plasticity_server, default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def post(server, body):
    return requests.post(server.url + "/train", json=body, headers=AUTH, timeout=600)


def version(server):
    return requests.get(server.url + "/train/status", headers=AUTH, timeout=30).json()["weight_version"]


def pair(tok, context):
    return {"context_ids": tok(context)["input_ids"], "chosen_ids": tok(CHOSEN)["input_ids"],
            "rejected_ids": tok(REJECTED)["input_ids"]}


def margin(server, model, sample) -> float:
    """log p(chosen | context) - log p(rejected | context), through the server."""
    def logp(continuation):
        ids = sample["context_ids"] + continuation
        return sum(prompt_logprobs(server.url, model, ids, API_KEY)[len(sample["context_ids"]) - 1:])
    return logp(sample["chosen_ids"]) - logp(sample["rejected_ids"])


def test_dpo_widens_the_margin_on_trained_and_held_out_pairs(plasticity_server, default_model, tok):
    server, model = plasticity_server, str(default_model)
    train, held = [pair(tok, c) for c in TRAIN], [pair(tok, c) for c in HELD_OUT]
    before = [margin(server, model, s) for s in train + held]
    r = post(server, {"objective": "dpo", "samples": train, "steps": 8, "beta": 0.5, "force": True,
                      "optimizer": {"lr": 1e-3}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["objective"] == "dpo" and body["steps"] == 8
    assert len(body["chosen_logps"]) == len(body["rejected_logps"]) == len(body["margins"]) == 8
    assert body["margins"][0] == pytest.approx(0.0, abs=1e-4)  # the reference is the weights at the start
    assert body["margins"][-1] > body["margins"][0] and body["losses"][-1] < body["losses"][0]
    after = [margin(server, model, s) for s in train + held]
    gains = [a - b for a, b in zip(after, before)]
    assert sum(gains[: len(train)]) / len(train) > 0.5
    assert all(g > 0 for g in gains[len(train):]), gains  # held-out pairs of the same kind move too


def test_orpo_trains_and_reports_its_log_odds_ratio(plasticity_server, tok):
    r = post(plasticity_server, {"objective": "orpo", "samples": [pair(tok, c) for c in TRAIN[:2]], "steps": 2,
                                 "lambda": 0.2, "force": True, "optimizer": {"lr": 1e-4}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steps"] == 2 and len(body["margins"]) == 2 and all(m is not None for m in body["margins"])


def test_a_weight_of_zero_changes_nothing(plasticity_server, default_model, tok):
    server, model = plasticity_server, str(default_model)
    probe = tok(PROBE)["input_ids"]
    before, v = prompt_logprobs(server.url, model, probe, API_KEY), version(server)
    ids = tok("The garden gate was green")["input_ids"]
    for body in ({"samples": [{"context_ids": ids[:3], "continuation_ids": ids[3:], "weight": 0}]},
                 {"objective": "dpo", "samples": [{**pair(tok, "The cat felt"), "weight": 0.0}]}):
        r = post(server, {**body, "steps": 3, "force": True, "optimizer": {"lr": 1e-2}})
        assert r.status_code == 200, r.text
        assert r.json()["steps"] == 0 and r.json()["skipped_zero_weight"] == 1
    assert version(server) == v and prompt_logprobs(server.url, model, probe, API_KEY) == before


def test_malformed_preference_bodies_are_refused_and_change_nothing(plasticity_server, default_model, tok):
    server, model = plasticity_server, str(default_model)
    probe = tok(PROBE)["input_ids"]
    before, v = prompt_logprobs(server.url, model, probe, API_KEY), version(server)
    p = pair(tok, "The cat felt")
    bad = {
        "missing rejected": ({"objective": "orpo", "samples": [{k: p[k] for k in ("context_ids", "chosen_ids")}]},
                             "rejected_ids"),
        "sft sample for dpo": ({"objective": "dpo", "samples": [{"context_ids": [5], "continuation_ids": [6]}]},
                               "takes samples with context_ids, chosen_ids and rejected_ids"),
        "pair for sft": ({"samples": [p]}, "takes samples with context_ids and continuation_ids"),
        "beta for orpo": ({"objective": "orpo", "samples": [p], "beta": 0.1}, "beta applies to the dpo"),
        "lambda for dpo": ({"objective": "dpo", "samples": [p], "lambda": 0.1}, "lambda applies to the orpo"),
        "beta out of range": ({"objective": "dpo", "samples": [p], "beta": 0}, "beta"),
        "one reference": ({"objective": "dpo", "samples": [{**p, "ref_chosen_logp": -3.0}]}, "or neither"),
        "reference for orpo": ({"objective": "orpo", "samples": [{**p, "ref_chosen_logp": -3.0,
                                                                   "ref_rejected_logp": -4.0}]}, "dpo objective only"),
        "negative weight": ({"objective": "dpo", "samples": [{**p, "weight": -1}]}, "weight"),
        "boolean weight": ({"samples": [{"context_ids": [5], "continuation_ids": [6], "weight": True}]}, "boolean"),
        "no_grad for dpo": ({"objective": "dpo", "samples": [p], "context_mode": "no_grad"}, "sft only"),
        "unknown objective": ({"objective": "kto", "samples": [p]}, "objective"),
        "out of vocabulary": ({"objective": "dpo", "samples": [{**p, "rejected_ids": [10**6]}]}, "vocabulary"),
    }
    for label, (body, reason) in bad.items():
        r = post(server, body)
        assert 400 <= r.status_code < 500 and reason in r.text, (label, r.status_code, r.text[:300])
    r = requests.post(server.url + "/train", headers={**AUTH, "Content-Type": "application/json"}, timeout=60,
                      data='{"objective": "dpo", "beta": NaN, "samples": [{"context_ids": [5], "chosen_ids": [6], '
                           '"rejected_ids": [7]}]}')
    assert r.status_code == 400 and "beta" in r.text
    assert version(server) == v and prompt_logprobs(server.url, model, probe, API_KEY) == before


def test_dedup_keys_name_the_objective_and_both_continuations(plasticity_server, tok):
    p = pair(tok, "The kitchen clock felt")
    first = post(plasticity_server, {"objective": "dpo", "samples": [p], "optimizer": {"lr": 1e-5}}).json()
    again = post(plasticity_server, {"objective": "dpo", "samples": [p], "optimizer": {"lr": 1e-5}}).json()
    other = post(plasticity_server, {"objective": "orpo", "samples": [p], "optimizer": {"lr": 1e-5}}).json()
    swapped = post(plasticity_server, {"objective": "dpo", "optimizer": {"lr": 1e-5},
                                       "samples": [{**p, "rejected_ids": tok(" bored")["input_ids"]}]}).json()
    assert first["steps"] == 1 and again["steps"] == 0 and again["skipped_duplicates"] == 1
    assert other["steps"] == 1 and swapped["steps"] == 1
