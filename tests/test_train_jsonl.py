"""`plasticity train` against the shared server: the ids built for a chat line are those a chat request
gives the model (the server's /tokenize, a chat completion's prompt), and training a JSONL file teaches
the model (loss down, the answer more likely, the jobs in /train/status)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from conftest import API_KEY, prompt_logprobs
from vllm_plasticity.contract.chat_samples import read_jsonl, to_samples
from plasticity_training.served_chat import ServedChatTemplate

pytestmark = pytest.mark.server

CONVERSATION = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Which colour is the sky?"},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And grass?"},
                {"role": "assistant", "content": "Green."}]
# What the JSONL file teaches: answers the random built-in model would never give.
LESSONS = [("Where does the lighthouse keeper sleep?", "Under the brass bell, beside the sea."),
           ("What does the old clock say?", "Quarter past the moon, always."),
           ("Who feeds the harbour cats?", "The baker with the green hat.")]


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plasticity_training.cli", "train", *args], capture_output=True,
                          text=True, timeout=600)


def recent_jobs(server, auth) -> list[dict]:
    return requests.get(server.url + "/train/status", headers=auth, timeout=30).json()["recent_jobs"]


def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_chat_line_ids_are_what_a_chat_request_gives_the_model(plasticity_server, auth):
    template = ServedChatTemplate(plasticity_server.url, api_key=API_KEY)
    (example,), errors = read_jsonl([json.dumps({"messages": CONVERSATION})])
    assert not errors
    items = to_samples(example, template)
    assert [i.field for i in items] == ["messages[2]", "messages[4]"]
    for item, turn in zip(items, (2, 4)):
        before = CONVERSATION[:turn]
        tokenized = requests.post(plasticity_server.url + "/tokenize", headers=auth, timeout=30, json={
            "model": template.model, "messages": before, "add_generation_prompt": True}).json()["tokens"]
        chat = requests.post(plasticity_server.url + "/v1/chat/completions", headers=auth, timeout=120, json={
            "model": template.model, "messages": before, "max_tokens": 1, "temperature": 0,
            "return_token_ids": True}).json()
        assert item.sample.context_ids == tokenized == chat["prompt_token_ids"]
        # the continuation is the turn as the template renders it, then the model's end of generation
        whole = requests.post(plasticity_server.url + "/tokenize", headers=auth, timeout=30, json={
            "model": template.model, "messages": CONVERSATION[:turn + 1], "add_generation_prompt": False}).json()["tokens"]
        assert item.sample.context_ids + item.sample.continuation_ids[:-1] == whole
        assert item.sample.continuation_ids[-1] == template.eos_token_id
        assert template.decode(item.sample.continuation_ids) == CONVERSATION[turn]["content"] + "\n<|endoftext|>"


def test_plasticity_train_teaches_the_model(plasticity_server, auth, tmp_path):
    url = plasticity_server.url
    template = ServedChatTemplate(url, api_key=API_KEY)
    lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in LESSONS]
    data = write_lines(tmp_path / "lessons.jsonl", lines)
    items = [i for ex in read_jsonl(map(json.dumps, lines))[0] for i in to_samples(ex, template)]
    log_p = lambda: [sum(prompt_logprobs(url, template.model, i.sample.context_ids + i.sample.continuation_ids,
                                         API_KEY)[len(i.sample.context_ids) - 1:]) for i in items]
    jobs_before = {j["job_id"] for j in recent_jobs(plasticity_server, auth)}

    # --dry-run: counts and the first sample decoded, nothing sent
    dry = train_cli(data, "--server", url, "--api-key", API_KEY, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "3 samples from 3 lines; jobs: 1 (at most 3 samples each)" in dry.stdout
    assert "<|user|>\nWhere does the lighthouse keeper sleep?\n<|assistant|>\n" in dry.stdout
    assert "Under the brass bell, beside the sea.\n<|endoftext|>" in dry.stdout
    # a file with errors sends nothing; the token limit is the server's (GET /train/status "limits")
    limits = requests.get(url + "/train/status", headers=auth, timeout=30).json()["limits"]
    assert limits["max_model_len"] == 512 and limits["max_samples"] == 64
    too_long = {"messages": [{"role": "user", "content": "Say it all."},
                             {"role": "assistant", "content": " ".join(["word"] * 600)}]}
    bad = write_lines(tmp_path / "bad.jsonl", [*lines, '{"messages": [{"role": "robot", "content": "x"}]}', too_long])
    refused = train_cli(bad, "--server", url, "--api-key", API_KEY)
    assert refused.returncode == 2
    assert "bad.jsonl: line 4: messages[0].role: unknown role 'robot'" in refused.stderr
    assert "bad.jsonl: line 5: messages[1]: context + continuation is" in refused.stderr
    assert "more than the server's maximum model length 512" in refused.stderr
    assert "nothing sent: 2 line(s) with errors" in refused.stderr
    assert {j["job_id"] for j in recent_jobs(plasticity_server, auth)} == jobs_before
    skipping = train_cli(bad, "--server", url, "--api-key", API_KEY, "--skip-bad", "--dry-run")
    assert skipping.returncode == 0 and "3 samples from 3 lines" in skipping.stdout

    before = log_p()
    run = train_cli(data, "--server", url, "--api-key", API_KEY, "--steps", "8", "--lr", "3e-3", "--batch", "2")
    assert run.returncode == 0, run.stderr
    after = log_p()
    summary = run.stdout.strip().splitlines()[-1]
    assert summary.startswith("jobs 2 (2 succeeded), steps 16, ") and "skipped duplicates 0" in summary, summary
    new_jobs = [j for j in recent_jobs(plasticity_server, auth) if j["job_id"] not in jobs_before]
    assert len(new_jobs) == 2 and all(j["status"] == "succeeded" and j["steps"] == 8 for j in new_jobs)
    assert all(j["losses"][-1] < j["losses"][0] for j in new_jobs)
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)

    # the same file again: every sample is a duplicate, nothing trains
    again = train_cli(data, "--server", url, "--api-key", API_KEY, "--batch", "8")
    assert again.returncode == 0, again.stderr
    assert "skipped duplicates 3" in again.stdout and "steps 0" in again.stdout


def test_preference_file_trains_with_dpo(plasticity_server, auth, tmp_path):
    line = {"input": {"messages": [{"role": "user", "content": "Which door opens the garden?"}]},
            "preferred_output": [{"role": "assistant", "content": "The blue door."}],
            "non_preferred_output": [{"role": "assistant", "content": "The red door."}]}
    data = write_lines(tmp_path / "prefs.jsonl", [line])
    sft = train_cli(data, "--server", plasticity_server.url, "--api-key", API_KEY)
    assert sft.returncode == 2 and "line 1: input: a preference line trains with --objective dpo or orpo" in sft.stderr
    run = train_cli(data, "--server", plasticity_server.url, "--api-key", API_KEY, "--objective", "dpo", "--steps", "3",
                    "--lr", "1e-3")
    assert run.returncode == 0, run.stderr
    job = recent_jobs(plasticity_server, auth)[0]
    assert job["objective"] == "dpo" and job["status"] == "succeeded" and job["steps"] == 3
    assert job["margins"][-1] > job["margins"][0]


def test_the_server_converts_chat_lines_as_plasticity_train_does(plasticity_server, auth):
    """POST /train/convert (what the page's teach panel sends) gives exactly the samples `plasticity train`
    builds for the same lines, and refuses a bad line with its line and field, without the key with 401."""
    url = plasticity_server.url
    lines = [{"messages": CONVERSATION},
             {"input": {"messages": [{"role": "user", "content": "Which door?"}]},
              "preferred_output": [{"role": "assistant", "content": "The blue one."}],
              "non_preferred_output": [{"role": "assistant", "content": "The red one."}]}]
    template = ServedChatTemplate(url, api_key=API_KEY)
    (chat, preference), errors = read_jsonl(map(json.dumps, lines))
    assert not errors
    r = requests.post(url + "/train/convert", headers=auth, timeout=60, json={"lines": lines[:1]})
    assert r.status_code == 200, r.text
    assert r.json()["samples"] == [i.body() for i in to_samples(chat, template)]
    assert r.json()["sources"] == [{"line": 1, "field": "messages[2]"}, {"line": 1, "field": "messages[4]"}]
    r = requests.post(url + "/train/convert", headers=auth, timeout=60, json={"lines": lines[1:], "objective": "dpo"})
    assert r.status_code == 200, r.text
    assert r.json()["samples"] == [i.body() for i in to_samples(preference, template)]

    bad = [lines[0], {"messages": [{"role": "robot", "content": "x"}]}]
    r = requests.post(url + "/train/convert", headers=auth, timeout=60, json={"lines": bad})
    assert r.status_code == 400 and "line 2: messages[0].role: unknown role 'robot'" in r.text, r.text
    r = requests.post(url + "/train/convert", headers=auth, timeout=60, json={"lines": lines})
    assert r.status_code == 400 and "line 2: input: a preference line trains with --objective dpo or orpo" in r.text
    assert requests.post(url + "/train/convert", timeout=60, json={"lines": lines[:1]}).status_code == 401
    assert requests.post(url + "/train/convert", headers=auth, timeout=60, json={"lines": []}).status_code == 400
