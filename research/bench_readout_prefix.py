"""Benchmark: what readout requests lose by not sharing the prefix cache, at a realistic layer shape.

Readout requests are salted per request (every prompt token must be computed to be scored), so a readout
request with a long shared prefix (a system prompt, a few-shot header) recomputes it every time, where a
plain request reuses its cached KV. This measures that cost on one `plasticity serve --vectors-dir` server:
sequential requests, each a shared prefix of `--prefix` tokens (whole KV blocks) and a distinct 16-token
suffix, generating `--tokens` tokens, median latency of:

    plain, cold     a prefix never seen (the prefix is computed)
    plain, warm     the same prefix again (its blocks come from the prefix cache)
    readout         the warm prefix with readout of a 1-layer, 32-concept bank (recomputed, then scored)

`readout - plain warm` is what per-block sharing of scores could save per readout request; `plain cold -
plain warm` is the prefix's compute alone. Random-init Llama (hidden 1024, intermediate 3072, 16 heads,
8 KV heads, 8 layers by default: the 105M shape of the other benchmarks), fp32.

    python research/bench_readout_prefix.py [--prefix 384] [--requests 8] [--out research/readout_prefix_results.md]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from lab import exit_on_sigterm  # noqa: E402  (a SIGTERM ends the run through its `finally`)

from plasticity_training.default_model import ModelSpec, build_model  # noqa: E402
from vllm_plasticity.contract.bank import save_bank  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402


def latency(server: ServerProcess, model: str, ids: list[int], tokens: int, xargs: dict | None = None) -> float:
    t0 = time.perf_counter()
    r = requests.post(server.url + "/v1/completions", timeout=600, json={
        "model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        **({"vllm_xargs": xargs} if xargs else {})})
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=384, help="shared prefix tokens (3 of vLLM's 128-token CPU blocks)")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).with_name("readout_prefix_results.md")))
    args = ap.parse_args()
    exit_on_sigterm()  # a `kill PID` stops the servers this run started

    with tempfile.TemporaryDirectory(prefix="plasticity-bench-prefix-") as tmp:
        workdir = Path(tmp)
        spec = ModelSpec(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=args.hidden // 16, num_hidden_layers=args.layers,
                         max_position_embeddings=1024, train_steps=0)
        model_dir = build_model(spec, workdir / "model", log=lambda m: print(m, file=sys.stderr))
        n_params = json.loads((model_dir / "plasticity_spec.json").read_text()).get("parameters")
        vectors = workdir / "vectors"
        save_bank(vectors / "one", [f"c{i}" for i in range(32)], {args.layers // 2: torch.randn(32, args.hidden)},
                  model="bench", method="random")
        server = ServerProcess.plasticity(model_dir, extra_args=["--dtype", "float32", "--max-model-len", "1024",
                                                                 "--vectors-dir", str(vectors)],
                                          log_path=workdir / "server.log")
        model, rng = str(model_dir), random.Random(0)
        tokens = lambda n: [rng.randrange(10, spec.vocab_size) for _ in range(n)]
        try:
            server.wait_ready(progress=lambda s: print(f"  ... starting ({s:.0f}s)", file=sys.stderr))
            r = requests.post(server.url + "/readout/load", json={"name": "one", "path": "one"}, timeout=60)
            r.raise_for_status()
            latency(server, model, tokens(args.prefix + 16), args.tokens)  # warm-up
            times = {"plain, cold": [], "plain, warm": [], "readout": []}
            for _ in range(args.requests):
                prefix = tokens(args.prefix)
                times["plain, cold"].append(latency(server, model, prefix + tokens(16), args.tokens))
                times["plain, warm"].append(latency(server, model, prefix + tokens(16), args.tokens))
                times["readout"].append(latency(server, model, prefix + tokens(16), args.tokens, {"readout": "one"}))
        finally:
            server.stop()

    median = {k: statistics.median(v) for k, v in times.items()}
    saving = median["readout"] - median["plain, warm"]
    lines = [
        "# Readout and the prefix cache: what recomputing a shared prefix costs",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Model: random-init Llama, {n_params / 1e6:.0f}M parameters, hidden {args.hidden}, {args.layers} layers, fp32. "
        f"Requests: sequential, a {args.prefix}-token shared prefix + 16 distinct tokens, {args.tokens} tokens "
        f"generated, {args.requests} of each kind, median latency.",
        "",
        "| request | median latency | vs plain, warm |",
        "| --- | --- | --- |",
        *[f"| {k} | {v * 1e3:.0f} ms | {v / median['plain, warm']:.2f} |" for k, v in median.items()],
        "",
        f"Reading: the prefix's compute alone (cold - warm) is {(median['plain, cold'] - median['plain, warm']) * 1e3:.0f} ms; "
        f"a readout request pays {saving * 1e3:.0f} ms more than a warm plain one, the most per-block score "
        f"sharing could save it ({saving / median['readout']:.0%} of its latency here).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
