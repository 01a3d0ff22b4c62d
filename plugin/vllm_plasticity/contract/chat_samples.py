"""OpenAI fine-tuning JSONL: each line checked, then turned into /train samples with the served model's own
chat template.

One conversion for every caller: `plasticity train` (client side, rendering through the server's
/tokenize over HTTP: served_chat.py) and the server's `POST /train/convert`, which the page's teach panel
uses (rendering through the same /tokenize in-process: chat_convert.py). Imports no vLLM. Two kinds of
line, as OpenAI's fine-tuning takes them:

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 1}]}
    {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

A chat line gives one `sft` sample per assistant turn (a turn's `weight: 0` skips it; it still conditions
the turns after it). A preference line gives one `dpo`/`orpo` sample. The context is what a chat request
for that turn would send the model: the template's rendering of every message before it, with the
generation prompt. The continuation is the turn as the template renders it after that prompt, up to and
including the token that ends a generation (appended when the template writes none), so the model learns
to stop. Errors name the line (1-based) and the field: `line 3: messages[1].role: unknown role 'bot' ...`.

    >>> examples, errors = read_jsonl(path.read_text().splitlines())
    >>> items = to_samples(examples[0], template)   # template: the server's /tokenize
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from vllm_plasticity.contract.settings import PreferenceSample, Sample, sample_length, sample_tokens

ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id")
CHAT_KEYS = ("messages", "tools", "parallel_tool_calls")
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls")
OBJECTIVES = ("sft", "dpo", "orpo")


class LineError(ValueError):
    """A line of the file that cannot be trained on: where (line, field) and why."""

    def __init__(self, line: int, field: str, reason: str) -> None:
        self.line, self.field, self.reason = line, field, reason
        super().__init__(f"line {line}: {field}: {reason}" if field else f"line {line}: {reason}")


@dataclasses.dataclass(frozen=True)
class ChatExample:
    """A chat SFT line: the messages as the template sees them (`weight` removed) and which turns train."""

    line: int
    messages: tuple[dict, ...]
    trained: tuple[int, ...]  # indices of the assistant turns with a loss
    tools: list | None = None


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """A preference line: the conversation so far, the preferred and the rejected assistant turn."""

    line: int
    messages: tuple[dict, ...]
    chosen: dict
    rejected: dict
    tools: list | None = None


Example = ChatExample | PreferenceExample


@dataclasses.dataclass(frozen=True)
class TrainItem:
    """One /train sample and where it came from (for error messages and --dry-run)."""

    line: int
    field: str
    sample: Sample | PreferenceSample

    def body(self) -> dict:
        return self.sample.model_dump(exclude_none=True, exclude_defaults=True)  # weight 1 is /train's default


class ChatTemplate(Protocol):
    """Token ids of messages rendered by a model's chat template (served_chat.ServedChatTemplate asks the
    server; tests may use a local tokenizer)."""

    stop_token_ids: frozenset[int]  # a generation ends at any of these
    eos_token_id: int | None  # appended to a turn whose rendering holds none of them

    def render(self, messages: list[dict], tools: list | None, add_generation_prompt: bool) -> list[int]:
        """The ids of MESSAGES as a chat request would give them to the model; ValueError when it cannot."""


def read_jsonl(lines: Iterable[str]) -> tuple[list[Example], list[LineError]]:
    """Every line parsed: the examples and, separately, the errors (at most one per line). Blank lines are
    skipped."""
    examples, errors = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            examples.append(parse_line(text, number))
        except LineError as exc:
            errors.append(exc)
    return examples, errors


def convert_lines(lines: Iterable[str], template: ChatTemplate, objective: str, max_model_len: int,
                  max_request_tokens: int, progress=lambda examples: examples) -> tuple[list[TrainItem], list[LineError]]:
    """Every line's samples, and every line's error (a line with an error gives no sample), in line order.
    PROGRESS wraps the parsed examples (a progress bar) while they are tokenized."""
    examples, errors = read_jsonl(lines)
    items = []
    for example in progress(examples):
        try:
            check_objective(example, objective)
            line_items = to_samples(example, template)
            for item in line_items:
                check_limits(item, max_model_len, max_request_tokens)
        except LineError as exc:
            errors.append(exc)
            continue
        items.extend(line_items)
    errors.sort(key=lambda e: e.line)
    return items, errors


def parse_line(text: str, line: int) -> Example:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(line, "", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LineError(line, "", f"a line is a JSON object, not {_kind(obj)}")
    is_chat, is_preference = "messages" in obj, any(k in obj for k in PREFERENCE_KEYS)
    if is_chat and is_preference:
        raise LineError(line, "messages", "a preference line puts its messages under input.messages")
    if is_preference:
        return _preference_example(obj, line)
    if is_chat:
        return _chat_example(obj, line)
    raise LineError(line, "", 'expected a chat line {"messages": [...]} or a preference line {"input": {"messages": '
                              '[...]}, "preferred_output": [...], "non_preferred_output": [...]}')


def check_objective(example: Example, objective: str) -> None:
    """Chat lines train with sft, preference lines with dpo or orpo."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "sft" and isinstance(example, PreferenceExample):
        raise LineError(example.line, "input", "a preference line trains with --objective dpo or orpo, not sft")
    if objective != "sft" and isinstance(example, ChatExample):
        raise LineError(example.line, "messages", f"--objective {objective} needs preference lines "
                                                  '({"input", "preferred_output", "non_preferred_output"})')


def to_samples(example: Example, template: ChatTemplate) -> list[TrainItem]:
    """The /train samples of one line, tokenized by TEMPLATE."""
    if isinstance(example, PreferenceExample):
        messages, field = list(example.messages), "preferred_output[0]"
        context = _context(template, messages, example.tools, example.line, "input.messages")
        chosen = _continuation(template, context, messages, example.chosen, example.tools, example.line, field)
        rejected = _continuation(template, context, messages, example.rejected, example.tools, example.line,
                                 "non_preferred_output[0]")
        return [TrainItem(example.line, "input", PreferenceSample(context_ids=context, chosen_ids=chosen,
                                                                  rejected_ids=rejected))]
    items = []
    for i in example.trained:
        field, before = f"messages[{i}]", list(example.messages[:i])
        context = _context(template, before, example.tools, example.line, field)
        continuation = _continuation(template, context, before, example.messages[i], example.tools, example.line, field)
        items.append(TrainItem(example.line, field, Sample(context_ids=context, continuation_ids=continuation)))
    return items


def stop_tokens(model_dir: str) -> tuple[int | None, frozenset[int]] | None:
    """(the token to append to a turn that renders none, every token a generation stops at), as vLLM reads
    them: the tokenizer's eos and generation_config.json's eos_token_id (an id or a list). None when
    `model_dir` is not a directory on this machine."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    from transformers import AutoTokenizer  # the tokenizer's own eos (its files name it several ways)

    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    generation = path / "generation_config.json"
    configured = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    stops = frozenset([*configured, *([eos] if eos is not None else [])])
    return (configured[0] if configured else eos), stops


def check_limits(item: TrainItem, max_model_len: int, max_request_tokens: int) -> None:
    """A sample the server would refuse whatever its batch: longer than the model's maximum length, or
    more tokens than one /train request may carry."""
    length = sample_length(item.sample)
    if length > max_model_len:
        raise LineError(item.line, item.field, f"context + continuation is {length} tokens, more than the server's "
                                               f"maximum model length {max_model_len}")
    tokens = sample_tokens(item.sample)
    if tokens > max_request_tokens:
        raise LineError(item.line, item.field, f"the sample is {tokens} tokens, more than one /train request may "
                                               f"carry on this server ({max_request_tokens}, PLASTICITY_TRAIN_MAX_TOKENS)")


def _chat_example(obj: dict, line: int) -> ChatExample:
    _known_keys(obj, CHAT_KEYS, line, "")
    messages = _messages(obj["messages"], line, "messages", weights=True)
    trained = tuple(i for i, m in enumerate(obj["messages"]) if m["role"] == "assistant" and m.get("weight", 1) == 1)
    if not trained:
        raise LineError(line, "messages", "no assistant turn to train on (none, or every one has weight 0)")
    return ChatExample(line, messages, trained, _tools(obj, line, "tools"))


def _preference_example(obj: dict, line: int) -> PreferenceExample:
    _known_keys(obj, PREFERENCE_KEYS, line, "")
    missing = [k for k in PREFERENCE_KEYS if k not in obj]
    if missing:
        raise LineError(line, missing[0], "missing: a preference line needs input, preferred_output and "
                                          "non_preferred_output")
    given = obj["input"]
    if not isinstance(given, dict) or "messages" not in given:
        raise LineError(line, "input", 'expected an object {"messages": [...]}')
    _known_keys(given, INPUT_KEYS, line, "input.")
    messages = _messages(given["messages"], line, "input.messages", weights=False)
    outputs = [_output(obj[k], line, k) for k in ("preferred_output", "non_preferred_output")]
    return PreferenceExample(line, messages, outputs[0], outputs[1], _tools(given, line, "input.tools"))


def _output(value, line: int, field: str) -> dict:
    """A preference output: a list of exactly one assistant message (OpenAI's form)."""
    if not isinstance(value, list) or len(value) != 1:
        raise LineError(line, field, "expected a list of one assistant message")
    (message,) = _messages(value, line, field, weights=False)
    if message["role"] != "assistant":
        raise LineError(line, f"{field}[0].role", f"expected 'assistant', got {message['role']!r}")
    return message


def _messages(value, line: int, field: str, weights: bool) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise LineError(line, field, "expected a non-empty list of messages")
    return tuple(_message(m, line, f"{field}[{i}]", weights) for i, m in enumerate(value))


def _message(m, line: int, field: str, weights: bool) -> dict:
    """One message checked; returned without `weight` (the template never sees it)."""
    if not isinstance(m, dict):
        raise LineError(line, field, f"a message is an object, not {_kind(m)}")
    _known_keys(m, MESSAGE_KEYS, line, field + ".")
    role = m.get("role")
    if role not in ROLES:
        raise LineError(line, f"{field}.role", f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if "weight" in m:
        weight = m["weight"]
        if not weights:
            raise LineError(line, f"{field}.weight", "weight is for assistant turns of chat lines")
        if role != "assistant":
            raise LineError(line, f"{field}.weight", f"weight is for assistant turns, not {role}")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise LineError(line, f"{field}.weight", f"expected 0 (skip the turn) or 1 (train it), got {weight!r}")
    content = m.get("content")
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise LineError(line, f"{field}.content", "missing (only an assistant turn with tool_calls may have none)")
    if content is not None and not isinstance(content, str):
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise LineError(line, f"{field}.content", 'expected a string or a list of {"type": "text", "text": ...} parts')
    return {k: v for k, v in m.items() if k != "weight"}


def _tools(obj: dict, line: int, field: str) -> list | None:
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise LineError(line, field, f"expected a list, not {_kind(tools)}")
    return tools


def _known_keys(obj: dict, known: tuple[str, ...], line: int, prefix: str) -> None:
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise LineError(line, prefix + unknown[0], f"unknown field: expected {', '.join(known)}")


def _context(template: ChatTemplate, messages: list[dict], tools, line: int, field: str) -> list[int]:
    context = _render(template, messages, tools, True, line, field)
    if not context:
        raise LineError(line, field, "the chat template renders nothing before this turn: a sample needs a context")
    return context


def _continuation(template: ChatTemplate, context: list[int], before: list[dict], turn: dict, tools, line: int,
                  field: str) -> list[int]:
    """The turn's tokens after its prompt, through the token that ends the generation."""
    whole = _render(template, before + [turn], tools, False, line, field)
    if whole[:len(context)] != context:
        # e.g. templates that render past turns differently from the last one (reasoning stripped)
        raise LineError(line, field, "the chat template does not render this turn as a continuation of its prompt")
    turn_ids = whole[len(context):]
    end = next((i for i, t in enumerate(turn_ids) if t in template.stop_token_ids), None)
    if end is not None:
        turn_ids = turn_ids[:end + 1]  # what follows the end token is the template's glue, never generated
    elif template.eos_token_id is not None:
        turn_ids = turn_ids + [template.eos_token_id]
    if not turn_ids:
        raise LineError(line, field, "the turn renders as no tokens")
    return turn_ids


def _render(template: ChatTemplate, messages: list[dict], tools, add_generation_prompt: bool, line: int,
            field: str) -> list[int]:
    try:
        return template.render(messages, tools, add_generation_prompt)
    except ValueError as exc:
        raise LineError(line, field, f"the chat template refused it: {exc}") from None


def _kind(value) -> str:
    return {list: "a list", str: "a string", type(None): "null", bool: "a boolean", int: "a number",
            float: "a number", dict: "an object"}.get(type(value), type(value).__name__)
