"""Benchmark: the trainer's forward of each project architecture against vLLM's served forward, per token at
the same batch (issue "The seed architectures at speed", item 3).

For each built-in architecture at its built-in shape (random init, fp32): `--batch` sequences of `--tokens`
byte tokens.
  trainer: the Hugging Face form (what the trainer steps) in this process, one torch thread (the trainer's
           budget on 2 cores), a full-sequence forward without gradients, and forward + backward
  served:  the plugin's vLLM model in an offline engine (a child process, one engine at a time), the same
           prompts prefilled in one engine step (max_num_batched_tokens >= batch x tokens), one generated
           token; the engine's own forward binds one core on this machine
Median of `--repeats` after a warm-up; every figure is a ratio against the other side, measured in the same
run. The goal (item 3): the trainer's forward no slower than the served forward per token (ratio <= 1).

    python research/trainer_vs_served_forward.py [--archs causal_bank,synthe,tkc_gru,tkc_mamba2]
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

ARCHS = ("causal_bank", "synthe", "tkc_gru", "tkc_mamba2")


def spec_for(name: str):
    """The built-in spec of `name`, untrained (the shape is what costs time, not the weights)."""
    from plasticity_training.default_causal_bank import CausalBankSpec
    from plasticity_training.default_synthe import SyntheSpec
    from plasticity_training.default_tkc import TKCSpec

    return {"causal_bank": lambda: CausalBankSpec(train_steps=0), "synthe": lambda: SyntheSpec(train_steps=0),
            "tkc_gru": lambda: TKCSpec(train_steps=0), "tkc_mamba2": lambda: TKCSpec(train_steps=0, backbone="mamba2")}[name]()


def prompts(batch: int, tokens: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(256) for _ in range(tokens)] for _ in range(batch)]


def trainer_side(model_dir: Path, batch: int, tokens: int, repeats: int) -> dict:
    """Seconds per forward (no grad) and per forward + backward of the HF form on the whole batch."""
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor(prompts(batch, tokens))

    def forward() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids)
        return time.perf_counter() - t0

    def forward_backward() -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    model.eval()
    forward(), forward_backward()  # warm-up
    return {"forward_s": [forward() for _ in range(repeats)], "forward_backward_s": [forward_backward() for _ in range(repeats)]}


def served_side(model_dir: Path, batch: int, tokens: int, repeats: int, result: Path) -> dict:
    """The same prompts prefilled by the plugin's vLLM model, in a child process (vLLM's own engine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLASTICITY_")}
    env.update(VLLM_PLUGINS="plasticity", VLLM_CPU_KVCACHE_SPACE="1")
    if not torch.cuda.is_available():
        env.update(VLLM_TARGET_DEVICE="cpu")
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--batch", str(batch), "--tokens", str(tokens),
           "--repeats", str(repeats), "--result", str(result)]
    proc = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"the served engine for {model_dir} failed (exit {proc.returncode})")
    return json.loads(result.read_text())


def child(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from plasticity_training.cli import model_architecture
    from vllm_plasticity import ARCHITECTURES

    budget = args.batch * (args.tokens + 1)
    arch = model_architecture(args.child)  # the project's own architectures are served by their name
    llm = LLM(model=args.child, dtype="float32", max_model_len=args.tokens + 8, max_num_seqs=args.batch,
              max_num_batched_tokens=max(budget, 2048), seed=0, enable_prefix_caching=False,
              hf_overrides={"architectures": [ARCHITECTURES.get(arch, arch)]})
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts(args.batch, args.tokens)]
    params = SamplingParams(max_tokens=1, temperature=0)

    def prefill() -> float:
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - t0

    prefill()  # warm-up: compiled paths
    Path(args.result).write_text(json.dumps({"prefill_s": [prefill() for _ in range(args.repeats)]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.child:
        return child(args)
    from plasticity_training.default_model import build_model

    torch.set_num_threads(1)
    rows, raw = [], {}
    with tempfile.TemporaryDirectory(prefix="trainer-vs-served-") as tmp:
        for name in args.archs.split(","):
            t0 = time.perf_counter()
            model_dir = build_model(spec_for(name), Path(tmp) / name, text="unused", log=lambda m: None)
            print(f"[bench] {name}: built in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            served = served_side(model_dir, args.batch, args.tokens, args.repeats, Path(tmp) / f"{name}.json")
            trainer = trainer_side(model_dir, args.batch, args.tokens, args.repeats)
            raw[name] = {**trainer, **served}
            n = args.batch * args.tokens
            s, f, fb = (statistics.median(raw[name][k]) for k in ("prefill_s", "forward_s", "forward_backward_s"))
            rows.append([name, f"{s / n * 1e6:.1f}", f"{f / n * 1e6:.1f}", f"{f / s:.2f}", f"{fb / n * 1e6:.1f}",
                         "yes" if f <= s else "**no**"])
            print(f"[bench] {name}: served {s:.3f}s, trainer forward {f:.3f}s, forward+backward {fb:.3f}s",
                  file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trainer_vs_served_forward.json").write_text(json.dumps(
        {"batch": args.batch, "tokens": args.tokens, "repeats": args.repeats, "raw": raw}, indent=1))
    table = ["| architecture | served us/token | trainer forward us/token | trainer / served | trainer fwd+bwd us/token | goal met (<= 1) |",
             "| --- | --- | --- | --- | --- | --- |", *("| " + " | ".join(r) + " |" for r in rows)]
    (args.out / "trainer_vs_served_forward.md").write_text("\n".join([
        "# The trainer's forward vs the served forward, per token at the same batch", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Command: "
        f"`python research/trainer_vs_served_forward.py --batch {args.batch} --tokens {args.tokens}`. "
        f"Written {time.strftime('%Y-%m-%d')}. Built-in shapes, random init, fp32; {args.batch} sequences of "
        f"{args.tokens} tokens; medians of {args.repeats}. Trainer: the HF form, one torch thread, no gradients "
        "(and forward + backward beside it). Served: vLLM's offline engine with the plugin, the batch prefilled in "
        "one engine step (plus one sampled token).", "", *table, ""]))


if __name__ == "__main__":
    main()
