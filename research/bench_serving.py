"""Benchmark: serving throughput of the plugin vs stock vLLM, side by side at a realistic layer shape.

One engine at a time (this machine has 2 cores), in this order: stock vLLM, `plasticity serve` (no
training, no vectors dir), `plasticity serve --training` with its default CPU kernels (vLLM's oneDNN
handles, packed again after each step), the same with PLASTICITY_CPU_KERNELS=in-place (F.linear on the
shared weights), stock again (the machine's drift shows as the difference between the two stock runs). Each server gets the same warm-up, then `--rounds` rounds of
`--concurrency` simultaneous completions of `--tokens` generated tokens each (greedy, ignore_eos), and
reports generated tokens per second of wall time. Ratios are against the mean of the two stock runs.
Each training server then runs one /train job (`--train-steps` steps of 4 samples x 128 tokens) and
reports its median step time and the worker's time packing the stepped layers again.

The model is built here: a random-init Llama with the built-in model's tokenizer and the layer shapes of a
real small model (default hidden 1024, intermediate 3072, 16 heads, 8 KV heads, 8 layers: 104M parameters).
Random weights are fine for speed.

    python research/bench_serving.py [--hidden 1024 --layers 8 ...] [--out research/serving_results.md]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from lab import exit_on_sigterm  # noqa: E402  (a SIGTERM ends the run through its `finally`)

from plasticity_training.default_model import ModelSpec, build_model  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "32"]


def throughput(server: ServerProcess, model: str, concurrency: int, tokens: int) -> float:
    """Generated tokens per second for `concurrency` simultaneous completions."""
    def one(i: int) -> int:
        r = requests.post(server.url + "/v1/completions", timeout=600, json={
            "model": model, "prompt": f"The story number {i} begins at the door of the old house and", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(one, range(concurrency)))
    return generated / (time.perf_counter() - t0)


def wait_trainer_ready(server: ServerProcess, timeout: float = 600) -> None:
    """Block until the server's trainer reports ready (it builds its view of the weights after the server is up)."""
    deadline = time.monotonic() + timeout
    while requests.get(server.url + "/train/status", timeout=10).json()["trainer"]["state"] != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError(f"the trainer of {server.url} did not become ready in {timeout:.0f}s")
        time.sleep(1)


def train_job(server: ServerProcess, vocab: int, steps: int) -> dict:
    """One /train job of `steps` steps; median step and repack seconds."""
    import random

    rng = random.Random(0)
    samples = [{"context_ids": [rng.randrange(10, vocab) for _ in range(32)],
                "continuation_ids": [rng.randrange(10, vocab) for _ in range(96)]} for _ in range(4)]
    r = requests.post(server.url + "/train", json={"samples": samples, "steps": steps}, timeout=1800)
    r.raise_for_status()
    job = requests.get(server.url + f"/train/status/{r.json()['job_id']}", timeout=30).json()
    return {"step_s": statistics.median(job["step_seconds"]),
            "repack_s": statistics.median(job["repack_seconds"]) if job["repack_seconds"] else None}


def run(kind: str, model: Path, args, workdir: Path) -> dict:
    extra = [*SERVER_ARGS, "--state-dir", str(workdir / f"state-{kind}")]
    if kind == "stock":
        server = ServerProcess.stock(model, extra_args=SERVER_ARGS, log_path=workdir / f"{kind}.log")
    else:
        server = ServerProcess.plasticity(model, extra_args=extra + (["--training"] if kind.startswith("training") else []),
                                          env={"PLASTICITY_CPU_KERNELS": "in-place"} if kind == "training-in-place" else None,
                                          log_path=workdir / f"{kind}.log")
    try:
        server.wait_ready(progress=lambda s: print(f"  ... {kind} starting ({s:.0f}s)", file=sys.stderr))
        if kind.startswith("training"):  # the trainer builds its view at start: not while throughput is measured
            wait_trainer_ready(server)
        throughput(server, str(model), args.concurrency, 8)  # warm-up: compile paths, caches
        rates = [throughput(server, str(model), args.concurrency, args.tokens) for _ in range(args.rounds)]
        info, train = {}, {}
        if kind != "stock":
            info = requests.get(server.url + "/plasticity/info", timeout=10).json()
        if kind.startswith("training"):
            train = train_job(server, args.vocab, args.train_steps)
        print(f"[serving] {kind}: {', '.join(f'{r:.1f}' for r in rates)} tok/s {train}", file=sys.stderr)
        kernels = ("vLLM's" if kind == "stock" else "F.linear on the shared weights" if info.get("weights_in_place") and
                   not info.get("repacked_after_step") else "vLLM's oneDNN, packed again after each step"
                   if info.get("repacked_after_step") else "vLLM's packed kernels")
        return {"kind": kind, "rates": rates, "kernels": kernels, **train}
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("serving_results.md")))
    args = ap.parse_args()
    exit_on_sigterm()  # a `kill PID` stops the servers this run started

    with tempfile.TemporaryDirectory(prefix="plasticity-bench-serving-") as tmp:
        workdir = Path(tmp)
        spec = ModelSpec(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         num_hidden_layers=args.layers, train_steps=0)
        model = build_model(spec, workdir / "model", log=lambda m: print(m, file=sys.stderr))
        n_params = json.loads((model / "plasticity_spec.json").read_text()).get("parameters")
        args.vocab = spec.vocab_size
        results = [run(kind, model, args, workdir)
                   for kind in ("stock", "plugin", "training", "training-in-place", "stock")]

    stock = statistics.mean(r for res in results if res["kind"] == "stock" for r in res["rates"])
    size = f"{n_params / 1e6:.0f}M parameters" if n_params else "size unknown"
    lines = [
        "# Serving throughput: plugin vs stock vLLM",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Model: random-init Llama, {size}, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads / {args.kv_heads} KV heads, {args.layers} layers, fp32, vocabulary {spec.vocab_size}  ",
        f"Load: {args.concurrency} concurrent greedy completions of {args.tokens} tokens, {args.rounds} rounds per "
        "server after a warm-up; servers run one after another in the order below.",
        "",
        "| server | linear layers multiply with | tok/s per round | mean tok/s | vs stock (mean of both stock runs) | "
        "/train step (median) | packing the stepped layers again (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"stock": "stock vLLM", "plugin": "plasticity serve", "training": "plasticity serve --training",
             "training-in-place": "plasticity serve --training, PLASTICITY_CPU_KERNELS=in-place"}
    for res in results:
        mean = statistics.mean(res["rates"])
        step = f"{res['step_s']:.2f} s" if "step_s" in res else "-"
        repack = f"{res['repack_s'] * 1e3:.0f} ms" if res.get("repack_s") is not None else "-"
        lines.append(f"| {names[res['kind']]} | {res['kernels']} | {', '.join(f'{r:.1f}' for r in res['rates'])} | "
                     f"{mean:.1f} | {mean / stock:.3f} | {step} | {repack} |")
    first, last = (statistics.mean(res["rates"]) for res in (results[0], results[-1]))
    lines += ["", f"The two stock runs differ by {abs(first - last) / stock:.1%} of their mean: the machine's drift "
              "over the run, the noise floor of every ratio above."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
