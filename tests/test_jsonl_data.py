"""OpenAI fine-tuning JSONL -> /train samples, without a server: line checks (errors name the line and the
field), turn weights, preference lines, and the conversion with the built-in model's own chat template
(a local tokenizer standing in for the server's /tokenize)."""

from __future__ import annotations

import json

import pytest

from vllm_plasticity.contract.chat_samples import (ChatExample, LineError, PreferenceExample, check_limits, check_objective,
                                            read_jsonl, to_samples)
from plasticity_training.train_cli import build_samples, make_batches, ServerLimits


def chat(*turns) -> str:
    """A chat line from (role, content[, extra fields]) turns."""
    messages = []
    for role, content, *extra in turns:
        messages.append({"role": role, "content": content, **(extra[0] if extra else {})})
    return json.dumps({"messages": messages})


USER_HI = ("user", "Hi there")
PREFERENCE = {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
              "preferred_output": [{"role": "assistant", "content": "Paris"}],
              "non_preferred_output": [{"role": "assistant", "content": "Lyon"}]}


class LocalTemplate:
    """The model's chat template through transformers, as the server's /tokenize applies it."""

    def __init__(self, path) -> None:
        from transformers import AutoTokenizer

        from plasticity_training.served_chat import stop_tokens

        self.tok = AutoTokenizer.from_pretrained(path)
        self.eos_token_id, self.stop_token_ids = stop_tokens(str(path))

    def render(self, messages, tools, add_generation_prompt):
        return list(self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True)["input_ids"])


class CharTemplate:
    """A template over characters: 'u:content;' per message ('>content;' for the assistant, '>' alone
    being the generation prompt), GLUE after each; ';' ends a generation when `stops` says so."""

    def __init__(self, stops=frozenset(), eos=None, glue="") -> None:
        self.stop_token_ids, self.eos_token_id, self.glue = frozenset(stops), eos, glue

    def render(self, messages, tools, add_generation_prompt):
        head = lambda role: ">" if role == "assistant" else role[0] + ":"
        text = "".join(f"{head(m['role'])}{m['content']};{self.glue}" for m in messages) + (">" if add_generation_prompt else "")
        return [ord(c) for c in text]


def errors_of(*lines: str) -> list[str]:
    return [str(e) for e in read_jsonl(lines)[1]]


# --- line checks -------------------------------------------------------------------------------------------

def test_errors_name_the_line_and_the_field():
    lines = [chat(USER_HI, ("assistant", "Hello")),
             "",                                                         # blank: skipped, still counted
             '{"messages": [{"role": "user", "content": "x"}',             # line 3: bad JSON
             chat(("bot", "x"), ("assistant", "y")),                       # line 4: unknown role
             json.dumps({k: v for k, v in PREFERENCE.items() if k != "non_preferred_output"}),  # line 5
             chat(USER_HI, ("assistant", "y", {"weight": 2})),             # line 6: weight not 0/1
             json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "x", "colour": "red"}]})]
    examples, errors = read_jsonl(lines)
    assert len(examples) == 1 and examples[0].line == 1
    assert [(e.line, e.field) for e in errors] == [(3, ""), (4, "messages[0].role"), (5, "non_preferred_output"),
                                                   (6, "messages[1].weight"), (7, "messages[0].content"),
                                                   (8, "messages[0].colour")]
    text = [str(e) for e in errors]
    assert text[0].startswith("line 3: not valid JSON")
    assert text[1] == "line 4: messages[0].role: unknown role 'bot': one of system, developer, user, assistant, tool"
    assert "preferred_output and non_preferred_output" in text[2]


def test_weight_zero_skips_a_turn_but_keeps_it_as_context():
    (example,), errors = read_jsonl([chat(USER_HI, ("assistant", "A", {"weight": 0}), ("user", "Again"),
                                          ("assistant", "B"), ("assistant", "C", {"weight": 1}))])
    assert not errors and isinstance(example, ChatExample)
    assert example.trained == (3, 4)
    assert all("weight" not in m for m in example.messages)  # the template never sees it
    items = to_samples(example, CharTemplate())
    assert [i.field for i in items] == ["messages[3]", "messages[4]"]
    text = lambda ids: "".join(map(chr, ids))
    assert text(items[0].sample.context_ids) == "u:Hi there;>A;u:Again;>"
    assert text(items[0].sample.continuation_ids) == "B;"


def test_every_turn_weight_zero_is_an_error():
    assert errors_of(chat(USER_HI, ("assistant", "A", {"weight": 0}))) == [
        "line 1: messages: no assistant turn to train on (none, or every one has weight 0)"]
    assert errors_of(chat(("user", "x", {"weight": 1}), ("assistant", "y"))) == [
        "line 1: messages[0].weight: weight is for assistant turns, not user"]


def test_preference_lines():
    (example,), errors = read_jsonl([json.dumps(PREFERENCE)])
    assert not errors and isinstance(example, PreferenceExample)
    assert example.chosen["content"] == "Paris" and example.rejected["content"] == "Lyon"
    (item,) = to_samples(example, CharTemplate())
    text = lambda ids: "".join(map(chr, ids))
    assert (text(item.sample.context_ids), text(item.sample.chosen_ids), text(item.sample.rejected_ids)) == (
        "u:Capital of France?;>", "Paris;", "Lyon;")
    bad = dict(PREFERENCE, preferred_output=[{"role": "user", "content": "Paris"}])
    assert errors_of(json.dumps(bad)) == ["line 1: preferred_output[0].role: expected 'assistant', got 'user'"]
    assert errors_of(json.dumps(dict(PREFERENCE, preferred_output=[]))) == [
        "line 1: preferred_output: expected a list of one assistant message"]


def test_objective_must_match_the_kind_of_line():
    (chat_example, pref_example), _ = read_jsonl([chat(USER_HI, ("assistant", "A")), json.dumps(PREFERENCE)])
    check_objective(chat_example, "sft")
    check_objective(pref_example, "dpo")
    with pytest.raises(LineError, match="line 2: input: a preference line trains with --objective dpo or orpo"):
        check_objective(pref_example, "sft")
    with pytest.raises(LineError, match="line 1: messages: --objective orpo needs preference lines"):
        check_objective(chat_example, "orpo")


# --- conversion -------------------------------------------------------------------------------------------

def test_continuation_ends_at_the_end_token_or_gets_one():
    (example,), _ = read_jsonl([chat(USER_HI, ("assistant", "Yo"))])
    # the template's glue after the end token is never generated: cut
    ends_at_semicolon = to_samples(example, CharTemplate(stops={ord(";")}, glue="\n"))[0].sample
    assert ends_at_semicolon.continuation_ids == [ord(c) for c in "Yo;"]
    # a template that writes no end token: the model's eos is appended, so the model learns to stop
    with_eos = to_samples(example, CharTemplate(stops={0}, eos=0, glue="\n"))[0].sample
    assert with_eos.continuation_ids == [ord(c) for c in "Yo;\n"] + [0]
    # unknown end token (the model's directory not visible): the turn as the template renders it
    as_rendered = to_samples(example, CharTemplate(glue="\n"))[0].sample
    assert as_rendered.continuation_ids == [ord(c) for c in "Yo;\n"]


def test_a_template_that_rewrites_the_prompt_is_refused():
    class Rewrites(CharTemplate):
        def render(self, messages, tools, add_generation_prompt):
            ids = super().render(messages, tools, add_generation_prompt)
            return ids if add_generation_prompt else [7] + ids

    (example,), _ = read_jsonl([chat(USER_HI, ("assistant", "Yo"))])
    with pytest.raises(LineError, match="line 1: messages\\[1\\]: the chat template does not render this turn"):
        to_samples(example, Rewrites())


def test_built_in_model_chat_template(default_model):
    """The built-in template writes no end token: the continuation is the turn and the model's eos."""
    template = LocalTemplate(default_model)
    (example,), _ = read_jsonl([chat(("system", "Be brief."), USER_HI, ("assistant", "Hello!"))])
    (item,) = to_samples(example, template)
    tok = template.tok
    assert tok.decode(item.sample.context_ids) == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert tok.decode(item.sample.continuation_ids) == "Hello!\n<|endoftext|>"
    assert item.sample.continuation_ids[-1] == tok.eos_token_id
    # the context is exactly what a chat request for that turn renders
    assert item.sample.context_ids == template.render(list(example.messages[:2]), None, True)


def test_lines_over_the_token_limit_are_errors_naming_the_line(default_model):
    template = LocalTemplate(default_model)
    long_answer = " ".join(["word"] * 300)
    lines = [chat(USER_HI, ("assistant", "short")), chat(USER_HI, ("assistant", long_answer))]
    limits = ServerLimits(max_samples=64, max_tokens=8192, max_steps=1000, max_model_len=128)
    items, errors = build_samples(lines, template, "sft", limits)
    assert [i.line for i in items] == [1]
    assert len(errors) == 1 and errors[0].line == 2 and errors[0].field == "messages[1]"
    assert "more than the server's maximum model length 128" in str(errors[0])
    with pytest.raises(LineError, match="more than one /train request may carry"):
        check_limits(items[0], max_model_len=512, max_request_tokens=5)


def test_batches_respect_the_servers_per_request_limits():
    (example,), _ = read_jsonl([chat(*[t for i in range(5) for t in (("user", f"q{i}"), ("assistant", f"a{i}"))])])
    items = to_samples(example, CharTemplate())
    assert [len(b) for b in make_batches(items, max_samples=2, max_tokens=10_000)] == [2, 2, 1]
    cost = [len(i.sample.context_ids) + len(i.sample.continuation_ids) for i in items]
    batches = make_batches(items, max_samples=64, max_tokens=cost[0] + cost[1])
    assert [len(b) for b in batches] == [2, 1, 1, 1]
    assert items[0].body() == {"context_ids": items[0].sample.context_ids,
                               "continuation_ids": items[0].sample.continuation_ids}
