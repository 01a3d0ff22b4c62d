"""`make demo`: a scripted tour of what plasticity does, on the built-in model.

Runs in its own process: builds (or reuses) the built-in model, starts `plasticity serve` on a free port,
walks through the features that exist, prints what it sees, and stops the server by PID however it ends.

    $ make demo
    $ python -m vllm_plasticity.demo [--keep-logs]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import requests

from vllm_plasticity.launcher import ServerProcess
from vllm_plasticity.weight_sharing import ARENA_PREFIX, SHM_DIR, WeightManifest, map_shared_weights


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def complete(url: str, model: str, prompt: str, max_tokens: int = 24) -> str:
    r = requests.post(url + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the server log directory")
    args = parser.parse_args()
    from plasticity_training.default_model import default_model_path

    step("1. The built-in model (built from this project's own text on first use)")
    model_dir = default_model_path(log=lambda m: print("  " + m, flush=True))
    spec = json.loads((model_dir / "plasticity_spec.json").read_text())
    print(f"  {model_dir}\n  {spec['parameters'] / 1e6:.2f}M parameters, {spec['num_hidden_layers']} layers, "
          f"final training loss {spec['final_loss']}")

    work = Path(tempfile.mkdtemp(prefix="plasticity-demo-"))
    step("2. Start vLLM with the plugin: plasticity serve MODEL")
    server = ServerProcess.plasticity(model_dir, extra_args=["--dtype", "float32", "--state-dir", str(work / "state")],
                                      env={"PLASTICITY_SHARE_WEIGHTS": "1"}, log_path=work / "server.log")
    print(f"  pid {server.pid}, {server.url}, log {server.log_path}")
    try:
        t0 = time.monotonic()
        server.wait_ready(progress=lambda s: print(f"  ... starting ({s:.0f}s; the first start compiles the model)", flush=True))
        print(f"  ready in {time.monotonic() - t0:.0f}s")
        model = str(model_dir)

        step("3. GET /plasticity/info")
        info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        for key in ("version", "architecture", "dtype", "device", "weights_shareable", "features"):
            print(f"  {key}: {info[key]}")

        step("4. A completion through the OpenAI API")
        prompt = "The old house"
        text = complete(server.url, model, prompt)
        print(f"  prompt: {prompt!r}\n  completion: {text!r}")

        step("5. A chat completion (the model's own chat template)")
        r = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "Tell me about the morning."}],
            "max_tokens": 24, "temperature": 0})
        print(f"  assistant: {r.json()['choices'][0]['message']['content']!r}")

        step("6. The served weights are shared memory: change one from this process, no restart")
        weights = map_shared_weights(WeightManifest.from_dict(json.loads(Path(info["weight_manifest"]).read_text())))
        head = weights["lm_head.weight"]
        saved = head.clone()
        head.mul_(-1.0)
        print(f"  lm_head negated -> {complete(server.url, model, prompt)!r}")
        head.copy_(saved)
        restored = complete(server.url, model, prompt)
        print(f"  restored        -> {restored!r} (identical: {restored == text})")
    finally:
        step("Stopping the server")
        server.stop()
        left = list(SHM_DIR.glob(ARENA_PREFIX + "*"))
        print(f"  stopped pid {server.pid}; shared-memory files left: {len(left)}")
        if not args.keep_logs:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
