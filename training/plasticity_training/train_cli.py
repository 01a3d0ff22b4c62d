"""`plasticity train`: teach a running server an OpenAI fine-tuning JSONL file.

Client side; imports no vLLM. Every line is checked and tokenized with the served model's own chat template
(contract/chat_samples.py, served_chat.py) before anything is sent: a file with errors sends nothing unless
--skip-bad. The samples then go to POST /train in batches (one job per batch, --steps optimizer steps
each), with a progress bar over the steps, and a summary at the end.

    plasticity train --server http://localhost:8000 --api-key KEY data.jsonl --steps 4 --lr 1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from vllm_plasticity.contract.chat_samples import OBJECTIVES, LineError, TrainItem, convert_lines
from plasticity_training.served_chat import ServedChatTemplate, ServerError
from vllm_plasticity.config import TrainLimits
from vllm_plasticity.contract.settings import OptimizerSettings, sample_tokens

DEFAULT_BATCH = 8
POLL_SECONDS = 0.2
ENDED = ("succeeded", "failed", "rejected", "diverged", "cancelled")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one /train request may carry on this server (GET /train/status; the defaults where the server
    does not say)."""

    max_samples: int
    max_tokens: int
    max_steps: int
    max_model_len: int


@dataclasses.dataclass
class Summary:
    jobs: int = 0
    succeeded: int = 0
    steps: int = 0
    tokens: int = 0  # continuation tokens x steps
    skipped_duplicates: int = 0
    first_loss: float | None = None
    final_loss: float | None = None  # the last job's last step (first_loss: the first job's first step)
    failure: str | None = None

    def line(self) -> str:
        loss = ("n/a (no step taken)" if self.final_loss is None
                else f"{self.final_loss:.4f} (first {self.first_loss:.4f})")
        return (f"jobs {self.jobs} ({self.succeeded} succeeded), steps {self.steps}, tokens trained {self.tokens}, "
                f"skipped duplicates {self.skipped_duplicates}, final loss {loss}")


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    try:
        sys.exit(run(args))
    except ServerError as exc:
        print(f"plasticity train: {exc}", file=sys.stderr)
        sys.exit(1)


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 a job or the server failed, 2 the input has errors (nothing sent)."""
    if args.batch < 1 or args.steps < 1:
        return _usage(f"--batch and --steps are at least 1, got {args.batch} and {args.steps}")
    try:
        optimizer = OptimizerSettings(lr=args.lr) if args.lr is not None else None
    except ValidationError as exc:
        return _usage(f"--lr {args.lr}: {exc.errors()[0]['msg']}")
    try:
        text = Path(args.data).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return _usage(f"{args.data}: cannot read it ({exc})")
    template = ServedChatTemplate(args.server, api_key=args.api_key)
    limits = server_limits(template)
    if args.steps > limits.max_steps:
        return _usage(f"--steps {args.steps} is more than this server's limit {limits.max_steps} (PLASTICITY_TRAIN_MAX_STEPS)")
    items, errors = build_samples(text, template, args.objective, limits)
    for error in errors:
        print(f"plasticity train: {args.data}: {error}", file=sys.stderr)
    if errors and not args.skip_bad:
        print(f"plasticity train: nothing sent: {len(errors)} line(s) with errors (--skip-bad trains the others)",
              file=sys.stderr)
        return 2
    if not items:
        print("plasticity train: no sample to train on", file=sys.stderr)
        return 2
    batches = make_batches(items, min(args.batch, limits.max_samples), limits.max_tokens)
    if args.dry_run:
        print(describe(items, batches, template, args.steps))
        return 0
    fields = {"objective": args.objective, "steps": args.steps, "force": args.force,
              **({"optimizer": optimizer.model_dump(include={"lr"})} if optimizer else {})}
    summary = train(template, batches, fields)
    print(summary.line())
    if summary.failure:
        print(f"plasticity train: stopped: {summary.failure}", file=sys.stderr)
        return 1
    return 0


def server_limits(template: ServedChatTemplate) -> ServerLimits:
    try:
        given = template.get("/train/status").get("limits") or {}
    except ServerError as exc:
        if exc.status not in (403, 404):  # training off, or an older server: --dry-run still works
            raise
        given = {}
    d = TrainLimits()
    return ServerLimits(max_samples=given.get("max_samples", d.max_samples), max_tokens=given.get("max_tokens", d.max_tokens),
                        max_steps=given.get("max_steps", d.max_steps),
                        max_model_len=given.get("max_model_len", template.max_model_len or sys.maxsize))


def build_samples(lines: list[str], template, objective: str, limits: ServerLimits) -> tuple[list[TrainItem], list[LineError]]:
    """Every line's samples, and every line's error (a line with an error gives no sample)."""
    bar = lambda examples: tqdm(examples, desc="tokenize", unit="line", leave=False, disable=len(examples) < 50)
    return convert_lines(lines, template, objective, limits.max_model_len, limits.max_tokens, progress=bar)


def make_batches(items: list[TrainItem], max_samples: int, max_tokens: int) -> list[list[TrainItem]]:
    """Consecutive samples, at most MAX_SAMPLES and MAX_TOKENS (the server's per-request limits) a batch."""
    batches, tokens = [], 0
    for item in items:
        cost = sample_tokens(item.sample)
        if not batches or len(batches[-1]) >= max_samples or tokens + cost > max_tokens:
            batches.append([])
            tokens = 0
        batches[-1].append(item)
        tokens += cost
    return batches


def describe(items: list[TrainItem], batches: list[list[TrainItem]], template, steps: int) -> str:
    """--dry-run: token counts and the first sample as the model will read it."""
    contexts = [len(i.sample.context_ids) for i in items]
    continuations = [sum(map(len, i.sample.sequences())) for i in items]
    first = items[0].sample
    lines = [f"{len(items)} samples from {len({i.line for i in items})} lines; jobs: {len(batches)} (at most "
             f"{max(map(len, batches))} samples each), steps per job: {steps}",
             f"context tokens {sum(contexts)} (longest {max(contexts)}), continuation tokens {sum(continuations)} "
             f"(longest {max(continuations)}), tokens per request at most {max(sum(map(sample_tokens, (i.sample for i in b))) for b in batches)}",
             f"first sample (line {items[0].line}, {items[0].field}):",
             f"--- context ({len(first.context_ids)} tokens) ---", template.decode(first.context_ids)]
    for name, ids in zip(("chosen" if hasattr(first, "chosen_ids") else "continuation", "rejected"), first.sequences()):
        lines += [f"--- {name} ({len(ids)} tokens) ---", template.decode(ids)]
    return "\n".join(lines)


def train(template: ServedChatTemplate, batches: list[list[TrainItem]], fields: dict) -> Summary:
    """One /train job per batch, in order; stops at the first job that does not succeed."""
    summary = Summary()
    steps = fields["steps"]
    with tqdm(total=len(batches) * steps, unit="step", desc="train", dynamic_ncols=True) as bar:
        for n, batch in enumerate(batches):
            try:
                job = template.post("/train", {**fields, "samples": [i.body() for i in batch], "wait": False})
                job = _follow(template, job["job_id"], bar, summary)
            except ServerError as exc:  # refused (4xx with the reason) or gone: what was trained stays trained
                summary.failure = str(exc)
                break
            summary.jobs += 1
            summary.steps += job["steps"]
            summary.tokens += job["tokens"] * job["steps"]
            summary.skipped_duplicates += job["skipped_duplicates"]
            bar.update((n + 1) * steps - bar.n)  # steps a job did not take (duplicates only) still count as done
            if job["status"] != "succeeded":
                summary.failure = f"job {job['job_id']} {job['status']}: {job.get('error') or 'no reason given'}"
                break
            summary.succeeded += 1
    return summary


def _follow(template: ServedChatTemplate, job_id: str, bar: tqdm, summary: Summary) -> dict:
    """Poll the job until it ends, moving the bar one step per loss the job reports."""
    seen = 0
    while True:
        job = template.get(f"/train/status/{job_id}")
        losses = job["losses"]
        if len(losses) > seen:
            if summary.first_loss is None:
                summary.first_loss = losses[0]
            summary.final_loss = losses[-1]
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tokens=summary.tokens + job["tokens"] * len(losses), refresh=False)
            bar.update(len(losses) - seen)
            seen = len(losses)
        if job["status"] in ENDED:
            return job
        time.sleep(POLL_SECONDS)


def _usage(message: str) -> int:
    print(f"plasticity train: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plasticity train",
        description="Train a running `plasticity serve --training` server on an OpenAI fine-tuning JSONL file: "
                    "chat lines {\"messages\": [...]} (loss on assistant turns; \"weight\": 0 skips a turn) or "
                    "preference lines {\"input\": {\"messages\": [...]}, \"preferred_output\": [...], "
                    "\"non_preferred_output\": [...]}. Lines are tokenized with the served model's chat template.")
    p.add_argument("data", help="the .jsonl file")
    p.add_argument("--server", default="http://localhost:8000", help="the server's URL (default http://localhost:8000)")
    p.add_argument("--api-key", help="the server's --api-key")
    p.add_argument("--objective", choices=OBJECTIVES, default="sft",
                   help="sft (chat lines, default); dpo or orpo (preference lines)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per batch (default 1)")
    p.add_argument("--lr", type=float, help="learning rate (default: the server's, 1e-5)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                   help=f"samples per /train job (default {DEFAULT_BATCH}; fewer where the server's limits say)")
    p.add_argument("--force", action="store_true", help="train samples the server has already trained on")
    p.add_argument("--skip-bad", action="store_true", help="train the good lines of a file that has errors")
    p.add_argument("--dry-run", action="store_true", help="show token counts and the first sample decoded; send nothing")
    return p
