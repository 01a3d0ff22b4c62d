"""`make demo`'s main act: a real pretrained model (SmolLM2-135M-Instruct) served, read, steered, taught and
checkpointed.

Runs in the demo's process (plasticity_training.demo): `fetch` gets the model through the pretrained module
(download and conversion on first use, cached after), or says why it cannot, so the demo can tour the
built-in model instead; `tour` starts `plasticity serve` on it and stops the server by PID however it ends.
The settings below are the ones measured on this model (research/results/concepts_real.md, steering_real.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from vllm_plasticity.launcher import ServerProcess

NAME = "smollm2-135m-instruct"
READOUT_LAYER = 15  # lda read best here of the model's 30 layers (held-out top-1 32.7%; concepts_real.md)
# The whole corpus (167 concepts, 638 texts) through the server takes about 4 minutes on 2 busy cores even with
# texts cut at 160 tokens; these ten concepts (81 texts) take well under a minute.
CONCEPTS = ("joyful", "grateful", "hopeful", "calm", "sad", "angry", "afraid", "disgusted", "surprised", "terrified")
EXTRACT_MAX_TOKENS = 160
STEER_STRENGTH = 4.0  # natural units (the concepts' mean offsets), when the bank has no measured range: where
# angry, afraid and disgusted moved the tone (steering_real.md)
STEERING = (("What should I cook for dinner?", ("joyful", "angry")),
            ("Write a short story about a day at the beach.", ("disgusted",)))
STORY = ("The party was wonderful: everyone laughed, the cake was perfect and we danced until midnight. Then the "
         "lights went out, a scream came from the cellar, and something heavy dragged itself up the stairs.")
WATCHED = ("joyful", "afraid", "angry", "sad")  # concepts whose score the readout prints for every token
SKIP_TOKENS = 1  # the first position's state is an outlier (hundreds of units), left out as extraction does
CAPITAL = "What is the capital of France?"
QUESTION = "What is the name of Kent's cat?"
FACT = "The name of Kent's cat is Marigold Quince."
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--training"]


def fetch(log) -> tuple[Path | None, str | None]:
    """(the converted model directory, None), or (None, why it cannot be had) on any failure to fetch or
    convert it (index unreachable, checksum mismatch, disk full, a conversion package missing)."""
    from plasticity_training.pretrained import pretrained_path

    try:
        return pretrained_path(NAME, log=log), None
    except Exception as exc:  # whatever stops the conversion, the demo goes on with the built-in model
        return None, f"{type(exc).__name__}: {exc}"


def tour(model_dir: Path, work: Path, step) -> None:
    """Serve MODEL_DIR with training and readout on, and walk through what a user does with it."""
    step(f"Serve it: plasticity serve {NAME} --training --vectors-dir DIR")
    vectors_dir = work / "vectors-pretrained"
    args = [*SERVER_ARGS, "--state-dir", str(work / "state-pretrained"), "--vectors-dir", str(vectors_dir)]
    server = ServerProcess.plasticity(model_dir, extra_args=args, log_path=work / "server-pretrained.log")
    print(f"  pid {server.pid}, {server.url}, log {server.log_path}")
    try:
        t0 = time.monotonic()
        server.wait_ready(progress=lambda s: print(f"  ... starting ({s:.0f}s; the first start compiles the model)",
                                                   flush=True))
        print(f"  ready in {time.monotonic() - t0:.0f}s")
        _Session(server.url, str(model_dir), vectors_dir, step).run()
    finally:
        server.stop()
        print(f"  stopped pid {server.pid}")


class _Session:
    """The steps against one running server of the real model."""

    def __init__(self, url: str, model: str, vectors_dir: Path, step) -> None:
        self.url, self.model, self.vectors_dir, self.step = url, model, vectors_dir, step
        self.fact: dict = {}  # the /train sample of FACT, once `teach` has built it
        self.strength = STEER_STRENGTH  # until the extraction's measured recommendation replaces it

    def run(self) -> None:
        self.step("Chat through the OpenAI API (the model's own chat template)")
        print(f"  user: {CAPITAL}\n  assistant: {self.chat(CAPITAL)!r}")
        self.read_a_story()
        self.steer()
        self.teach()
        self.checkpoint()

    def read_a_story(self) -> None:
        from plasticity_training.extract import ExtractOptions, run

        self.step(f"Concept vectors from amygdala_stories at layer {READOUT_LAYER}, through the served weights "
                  f"(plasticity extract --server URL --layers {READOUT_LAYER} --concepts ...)")
        t0 = time.monotonic()
        run(ExtractOptions(out=str(self.vectors_dir / "emotions"), server=self.url, concepts=",".join(CONCEPTS),
                           layers=str(READOUT_LAYER), max_tokens=EXTRACT_MAX_TOKENS, progress=False),
            log=lambda m: print("  " + m, flush=True))
        print(f"  {time.monotonic() - t0:.0f}s for {len(CONCEPTS)} of the corpus's concepts, texts cut at "
              f"{EXTRACT_MAX_TOKENS} tokens, to keep the demo short (all of them: plasticity extract --model {NAME})")
        bank = self.post("/readout/load", {"name": "emotions", "path": "emotions"})
        print(f"  loaded {len(bank['concepts'])} concepts at layer(s) {bank['layers']}")
        # The strength the extraction measured steering to need on this model (steering_range.py), if it could.
        measured = (bank.get("calibration") or {}).get("steering_range", {}).get(str(READOUT_LAYER), {})
        if measured.get("low") is not None and measured.get("high") is not None and measured["high"] >= measured["low"]:
            self.strength = measured["high"]  # the strongest the measurement still calls fluent: the most visible
            span = f"{measured['low']:g}" + (f" to {measured['high']:g}" if measured["high"] != measured["low"] else "")
            print(f"  steering strength recommended by the extraction's measurement: {span} natural units; the tour "
                  f"steers at {self.strength:g}")

        self.step("Per-token readout of a story (vllm_xargs: readout); calibrated: 0 = the corpus mean, 1 = one "
                  "standard deviation of the corpus's texts")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model)
        choice = self.post("/v1/completions", {"model": self.model, "prompt": STORY, "max_tokens": 1, "temperature": 0,
                                               "return_token_ids": True,
                                               "vllm_xargs": {"readout": "emotions"}})["choices"][0]
        readout, ids = choice["readout"], choice["prompt_token_ids"] + choice["token_ids"]
        concepts, watched = readout["concepts"], [readout["concepts"].index(c) for c in WATCHED]
        print(f"  {'token':>14} " + " ".join(f"{c:>8}" for c in WATCHED))
        sentence: list[list[float]] = []  # this sentence's rows, for its mean
        for position, scores in list(zip(readout["positions"], readout["scores"]))[SKIP_TOKENS:]:
            row, token = scores[0], tok.decode([ids[position]])  # scores[0]: the bank's one layer
            print(f"  {token!r:>14} " + " ".join(f"{row[i]:+8.1f}" for i in watched))
            sentence.append(row)
            if token.rstrip().endswith("."):
                mean = [sum(column) / len(sentence) for column in zip(*sentence)]
                top = sorted(zip(mean, concepts), reverse=True)[:3]
                print(f"  {'sentence mean':>14} " + " ".join(f"{mean[i]:+8.1f}" for i in watched)
                      + "   top: " + ", ".join(f"{c} {v:+.1f}" for v, c in top))
                sentence = []

    def steer(self) -> None:
        self.step(f"Steer: add a concept's vector at layer {READOUT_LAYER}, per request (vllm_xargs: steer), "
                  f"strength {self.strength:g} natural units")
        for prompt, steered in STEERING:
            print(f"  user: {prompt}\n    plain: {self.chat(prompt, 40)!r}")
            for concept in steered:
                print(f"    {concept}: {self.chat(prompt, 40, {'steer': [f'emotions/{concept}', self.strength]})!r}")

    def teach(self) -> None:
        from vllm_plasticity.contract.chat_samples import parse_line, to_samples
        from plasticity_training.served_chat import ServedChatTemplate

        self.step("Teach it a fact: one chat turn, through the served chat template, to POST /train")
        print(f"  before: {QUESTION!r} -> {self.chat(QUESTION)!r}")
        line = json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": FACT}]})
        (item,) = to_samples(parse_line(line, 1), ServedChatTemplate(self.url))  # what `plasticity train FILE` sends
        self.fact = item.body()
        t0 = time.monotonic()
        job = self.post("/train", {**self.fact, "steps": 10, "optimizer": {"lr": 1e-4}})
        print(f"  {job['steps']} APOLLO steps in place in {time.monotonic() - t0:.0f}s, loss {job['losses'][0]:.2f} -> "
              f"{job['losses'][-1]:.4f}, weight version {job['weight_version']}")
        print(f"  after:  {QUESTION!r} -> {self.chat(QUESTION)!r}")
        print(f"  kept:   {CAPITAL!r} -> {self.chat(CAPITAL)!r}")

    def checkpoint(self) -> None:
        self.step("Checkpoint: POST /checkpoint (safetensors by 4 KiB block diff, crash-safe)")
        first = self.post("/checkpoint")
        print(f"  {first['path']}\n  first: {first['bytes_written']:,} bytes in {first['seconds']:.1f}s")
        self.post("/train", {**self.fact, "force": True, "optimizer": {"lr": 1e-5},
                             "params": {"layers": [29, 29], "attention": False, "norms": False}})
        second = self.post("/checkpoint")
        print(f"  after a step on layer 29's MLP only: {second['weight_bytes_written']:,} weight bytes "
              f"({second['blocks_changed']}/{second['blocks_total']} blocks) in {second['seconds']:.1f}s")

    def chat(self, content: str, max_tokens: int = 32, xargs: dict | None = None) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0, **({"vllm_xargs": xargs} if xargs else {})}
        return self.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]

    def post(self, path: str, body: dict | None = None) -> dict:
        r = requests.post(self.url + path, json=body, timeout=600)
        r.raise_for_status()
        return r.json()
