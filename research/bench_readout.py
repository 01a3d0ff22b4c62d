"""Benchmark: generation throughput with readout and steering on, side by side with idle and stock vLLM.

Runs vLLM's offline engine (`vllm.LLM`) in a child process per engine, one at a time: stock vLLM, the
plugin's architecture without the tap, then with the residual tap (PLASTICITY_VECTORS_DIR set). Every figure is generated
tokens/s of the same workload, as a ratio against the plugin-idle baseline measured in the same engine,
cases interleaved round by round so drift hits them all alike:

    stock vLLM (plugin installed, not enabled)      vs plugin idle (tapped layers, nothing loaded/asked)
    the plugin's architecture without the tap       vs plugin idle
    readout, 1 layer x 32 concepts                  vs plugin idle      goal >= 0.97
    steering at 1 layer                             vs plugin idle      goal >= 0.97
    readout + steering, 1 layer                     vs plugin idle
    readout at every layer x 32 concepts            vs plugin idle

The engine is measured without HTTP: on a 2-core machine the API server's Python and a client's threads
would otherwise dominate the noise. Readout cases include fetching the scores from the worker (what
the API server does per request) but not their JSON encoding.
Workload: `--requests` prompts of random token IDs (no case profits from the prefix cache) generating
`--tokens` tokens each, greedy.

    python research/bench_readout.py [--model DIR] [--rounds 7] [--out research/readout_results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_plasticity.contract.bank import save_bank
from plasticity_training.default_model import default_model_path


def child(args) -> None:
    """Runs in a fresh process: one engine, every case, JSON results written to --result."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_plasticity import ARCHITECTURES, WORKER_EXTENSION
    from plasticity_training.cli import model_architecture

    kwargs = dict(model=args.model, dtype="float32", max_model_len=512, max_num_seqs=args.requests, seed=0)
    plugin = args.child in ("untapped", "plasticity")
    if plugin:
        kwargs.update(hf_overrides={"architectures": [ARCHITECTURES[model_architecture(args.model)]]},
                      worker_extension_cls=WORKER_EXTENSION)
    llm = LLM(**kwargs)
    cases = {"stock": None} if not plugin else {"untapped": None}
    if args.child == "plasticity":
        n_layers = llm.llm_engine.model_config.hf_config.num_hidden_layers
        for name in ("one", "all"):
            llm.collective_rpc("plasticity_readout_load", args=(name, str(Path(args.vectors) / name), None, None))
        steer = {"steer": ["one/c0", 2.0]}
        cases = {"idle": None, "readout 1 layer x 32": {"readout": "one"}, "steer 1 layer": steer,
                 "readout + steer 1 layer": {"readout": "one", **steer},
                 f"readout {n_layers} layers x 32": {"readout": "all"}}

    def batch(seed: int, xargs: dict | None, n: int, tokens: int) -> float:
        rng = random.Random(seed)
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(10, 2000) for _ in range(24)]) for _ in range(n)]
        extra = {**xargs, "plasticity_key": "bench"} if xargs else None
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, extra_args=extra)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        if xargs and "readout" in xargs:
            fetched = llm.collective_rpc("plasticity_readout_fetch", args=("bench", True))[0]
            assert len(fetched) == n and all(len(r["positions"]) == 24 + tokens - 1 for r in fetched.values())
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

    for xargs in cases.values():  # warm-up
        batch(-1, xargs, args.requests, 8)
    results = {name: [] for name in cases}
    stats = {name: {"steps": 0, "bookkeeping_s": 0.0, "forward_s": 0.0} for name in cases}
    for r in range(args.rounds):
        # Each round starts with a different case: a fixed order would give one case (idle, the baseline)
        # the same place in every round, and whatever that place brings (drift within a round).
        order = list(cases.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for name, xargs in order:
            if args.child == "plasticity":
                llm.collective_rpc("plasticity_readout_stats")
            results[name].append(batch(r, xargs, args.requests, args.tokens))
            if args.child == "plasticity":
                for k, v in llm.collective_rpc("plasticity_readout_stats")[0].items():
                    stats[name][k] += v
        print(f"[bench] {args.child} round {r + 1}/{args.rounds}: "
              + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()), file=sys.stderr, flush=True)
    Path(args.result).write_text(json.dumps({"tokens_per_s": results, "stats": stats}))


def write_random_banks(model: Path, vectors: Path) -> int:
    """The banks the tapped engine loads: "one" (32 random concepts at the middle layer) and "all" (32 at
    every layer); returns that middle layer (where steering and one-layer readout run)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    hidden, n_layers = config.hidden_size, config.num_hidden_layers
    layer = n_layers // 2
    g = torch.Generator().manual_seed(0)
    save_bank(vectors / "one", [f"c{i}" for i in range(32)], {layer: torch.randn(32, hidden, generator=g)},
              model=str(model), method="random")
    save_bank(vectors / "all", [f"c{i}" for i in range(32)],
              {L: torch.randn(32, hidden, generator=g) for L in range(n_layers)}, model=str(model),
              method="random")
    return layer


def run_child(kind: str, args, vectors: Path) -> dict[str, list[float]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLASTICITY_") and k != "VLLM_PLUGINS"}
    if not torch.cuda.is_available():
        env.update(VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    if kind in ("untapped", "plasticity"):
        env.update(VLLM_PLUGINS="plasticity")
    if kind == "plasticity":
        env.update(PLASTICITY_VECTORS_DIR=str(vectors))
    result = vectors / f"{kind}.json"
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(args.model), "--vectors", str(vectors),
           "--rounds", str(args.rounds), "--requests", str(args.requests), "--tokens", str(args.tokens),
           "--result", str(result)]
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"{kind} engine failed (exit {proc.returncode})")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the built-in model)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).with_name("readout_results.md")))
    ap.add_argument("--child", choices=["stock", "untapped", "plasticity"], help=argparse.SUPPRESS)
    ap.add_argument("--vectors", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    args.model = Path(args.model or default_model_path())
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.model)
    hidden, n_layers = config.hidden_size, config.num_hidden_layers
    vectors = Path(tempfile.mkdtemp(prefix="bench-readout-"))
    layer = write_random_banks(args.model, vectors)
    stock = run_child("stock", args, vectors)["tokens_per_s"]
    untapped = run_child("untapped", args, vectors)["tokens_per_s"]
    tapped = run_child("plasticity", args, vectors)
    results, stats = tapped["tokens_per_s"], tapped["stats"]

    idle = statistics.median(results["idle"])
    rows = [("stock vLLM (its own engine, run first)", statistics.median(stock["stock"])),
            ("plugin architecture without the tap (no --vectors-dir; its own engine)",
             statistics.median(untapped["untapped"]))]
    rows += [(name, statistics.median(v)) for name, v in results.items()]
    lines = [
        "# Readout and steering throughput",
        "",
        f"`python research/bench_readout.py` on {platform.machine()} ({os.cpu_count()} cores), model "
        f"{args.model.name} ({n_layers} layers, hidden {hidden}), fp32, vLLM's default torch.compile (not "
        f"eager), offline engine; {args.requests} prompts x {args.tokens} generated tokens per batch, random "
        f"prompts, median of {args.rounds} interleaved rounds. Steering and one-layer readout at layer {layer}.",
        "",
        "| case | generated tokens/s | vs plugin idle (medians) | median of per-round ratios |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {tps:.0f} | {tps / idle:.3f} | "
          + (f"{statistics.median(a / b for a, b in zip(results[name], results['idle'])):.3f} |" if name in results else "|")
          for name, tps in rows],
        "",
        "Time per engine step in the tapped engine (the worker's own clock): the forward (the tap's op "
        "included) and the readout bookkeeping around it (batch layout before, score copy after).",
        "",
        "| case | steps | forward ms/step | bookkeeping ms/step |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {st['steps']} | {1e3 * st['forward_s'] / max(1, st['steps']):.3f} | "
          f"{1e3 * st['bookkeeping_s'] / max(1, st['steps']):.3f} |" for name, st in stats.items()],
        "",
        "Per-round figures: " + "; ".join(f"{k}: {', '.join(f'{x:.0f}' for x in v)}"
                                         for k, v in {**stock, **untapped, **results}.items()),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
