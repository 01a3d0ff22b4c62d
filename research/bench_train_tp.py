"""Benchmark: a /train step at --tensor-parallel-size 2 vs 1 on the same model, side by side in one run.

Runs in its own process and starts one `plasticity serve --training` server at a time (by PID, stopped at
the end): rounds of a TP 1 server and a TP 2 server (one trainer per shard), alternating which goes first,
each given a warm-up job and then the same jobs. Reports, per tensor-parallel size, the trainer's time per
step (forward, backward, optimizer: `step_seconds` of /train/status/{job}) and the end-to-end time per step
(the /train request's wall time over its steps: the API server, the trainers, publishing and, on CPU,
packing the stepped layers again), and their ratio TP 2 / TP 1. Then the same step without vLLM: one
trainer in this process and two trainer processes on the shards (plasticity_training.tensor_parallel over
gloo), one thread each, to separate the split model's own cost from sharing the cores with the engine.

The default model is a random-init Llama of about 25M parameters (8 layers, hidden 512, 8 query and 4 KV
heads, MLP 1536, its own BPE vocabulary of a few hundred tokens), large enough that the step is compute,
not per-call overhead, and small enough for 2 CPU cores; `--model DIR` takes any Llama/Qwen2/Qwen3
directory whose heads split over 2.

    python research/bench_train_tp.py [--model DIR] [--rounds 2] [--jobs 3] [--steps 4] [--out research/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import RESULTS, SERVER_ARGS, table, write_report, write_results  # noqa: E402

from plasticity_training.default_model import ModelSpec, build_model  # noqa: E402
from plasticity_training.vllm_layouts import vllm_layout, vllm_shard  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

SHAPE = ModelSpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, train_steps=0)
SIZES = {1: ([], {}), 2: (["--tensor-parallel-size", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})}  # a core per rank
TEXT = "\n\n".join(f"The {a} walked past the {b} and saw the {c}." for a, b, c in
                   zip(["farmer", "child", "doctor", "sailor"] * 40, ["mill", "bridge", "market", "harbour"] * 40,
                       ["storm", "lights", "crowd", "ship"] * 40))


def jobs_for(n_jobs: int, steps: int) -> list[dict]:
    """`n_jobs` distinct jobs of 4 samples x 48 tokens (distinct, so dedup never skips one)."""
    return [{"samples": [{"context_ids": [(7 * j + 3 * i + k) % 2000 + 5 for k in range(16)],
                          "continuation_ids": [(11 * j + 5 * i + k) % 2000 + 5 for k in range(32)]} for i in range(4)],
             "steps": steps, "optimizer": {"lr": 1e-4, "rank": 16}} for j in range(n_jobs)]


def measure(model: Path, tp: int, jobs: list[dict], work: Path, name: str) -> dict:
    """Start a server at tensor-parallel size `tp`, run a warm-up job and `jobs`; per-step figures."""
    args, env = SIZES[tp]
    server = ServerProcess.plasticity(model, extra_args=[*SERVER_ARGS, "--training", "--state-dir",
                                                         str(work / f"state-{name}"), *args],
                                      env=env, log_path=work / f"{name}.log")
    try:
        server.wait_ready()
        warm = {**jobs[0], "samples": jobs[0]["samples"][:1], "steps": 1}
        warm["samples"] = [{**warm["samples"][0], "context_ids": [1, 2, 3]}]
        requests.post(server.url + "/train", json=warm, timeout=900).raise_for_status()
        trainer, wall, tokens = [], [], 0
        for job in jobs:
            start = time.perf_counter()
            reply = requests.post(server.url + "/train", json=job, timeout=1800)
            reply.raise_for_status()
            seconds = time.perf_counter() - start
            detail = requests.get(server.url + f"/train/status/{reply.json()['job_id']}", timeout=30).json()
            trainer += detail["step_seconds"]
            wall.append(seconds / job["steps"])
            tokens += reply.json()["tokens"] * job["steps"]
        return {"tp": tp, "trainer_s": trainer, "wall_s": wall, "tokens": tokens, "seconds": sum(wall) * jobs[0]["steps"]}
    finally:
        server.stop()


def step_seconds(core, job: dict, steps: int) -> float:
    """Seconds per step of `job` on a TrainerCore (after one step that builds the optimizer state)."""
    core.begin_job(job["samples"], optimizer=job["optimizer"], force=True)
    core.step()
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    core.end_job()
    return (time.perf_counter() - start) / steps


def _rank_without_vllm(rank: int, model: str, work: str, job: dict, steps: int) -> None:
    import json

    import torch
    import transformers

    from plasticity_training.tensor_parallel import Shard
    from plasticity_training.trainer_core import TrainerCore

    torch.set_num_threads(1)  # a trainer's budget on 2 cores (plasticity_training.trainer)
    shard = Shard.join(rank, 2, f"file://{work}/rendezvous-without-vllm")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
        weights = vllm_shard(vllm_layout(model), config, rank, 2)
        core = TrainerCore(model, weights, f"{work}/state-without-vllm-2", shard=shard)
        seconds = step_seconds(core, job, steps)
        if rank == 0:
            Path(work, "without-vllm-2.json").write_text(json.dumps(seconds))
    finally:
        torch.distributed.destroy_process_group()


def without_vllm(model: Path, work: Path, job: dict, steps: int) -> dict:
    """The trainer's step with no engine beside it: one trainer (this process) vs two on the shards."""
    import json

    import torch
    import torch.multiprocessing as mp

    from plasticity_training.trainer_core import TrainerCore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = step_seconds(TrainerCore(model, vllm_layout(model), work / "state-without-vllm-1"), job, steps)
    finally:
        torch.set_num_threads(threads)
    mp.start_processes(_rank_without_vllm, args=(str(model), str(work), job, steps), nprocs=2, start_method="spawn")
    return {"1": one, "2": json.loads((work / "without-vllm-2.json").read_text())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: the 26M random-init Llama above)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-train-tp-"))
    model = Path(args.model) if args.model else build_model(SHAPE, work / "model", text=TEXT, log=lambda m: None)
    jobs = jobs_for(args.jobs, args.steps)
    runs = {1: [], 2: []}
    for r in range(args.rounds):
        for tp in ((1, 2) if r % 2 == 0 else (2, 1)):
            print(f"round {r + 1}: tensor-parallel size {tp}", file=sys.stderr, flush=True)
            runs[tp].append(measure(model, tp, jobs, work, f"r{r}-tp{tp}"))
    med = {tp: {"trainer": statistics.median(s for run in rs for s in run["trainer_s"]),
                "wall": statistics.median(s for run in rs for s in run["wall_s"]),
                "tokens_per_s": sum(run["tokens"] for run in rs) / sum(run["seconds"] for run in rs)}
           for tp, rs in runs.items()}
    alone = without_vllm(model, work, jobs[0], args.steps)
    rows = [[f"TP {tp}", m["trainer"], m["wall"], m["tokens_per_s"], alone[str(tp)]] for tp, m in med.items()]
    rows.append(["TP 2 / TP 1", med[2]["trainer"] / med[1]["trainer"], med[2]["wall"] / med[1]["wall"],
                 med[2]["tokens_per_s"] / med[1]["tokens_per_s"], alone["2"] / alone["1"]])
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    body = f"""Model: {model.name if args.model else 'random-init Llama'} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, \
{config.num_attention_heads} query / {config.num_key_value_heads} KV heads, MLP {config.intermediate_size}, vocabulary \
{config.vocab_size}), fp32. {args.rounds} rounds x {args.jobs} jobs x {args.steps} steps per size, 4 samples x 48 \
tokens per step, APOLLO rank 16 at lr 1e-4; the order of the two sizes alternates by round.

What 2 CPU cores can show: at TP 1 vLLM's worker has one core and the trainer one thread; at TP 2 each of
the two workers has one core (`VLLM_CPU_OMP_THREADS_BIND=0|1`) and each trainer one thread, so the two
trainers together use both cores while the engine idles, and every step adds the all-reduces of the split
model (gloo over loopback TCP: two per decoder layer forward and two backward, three for the
vocabulary-parallel loss, the optimizer's sums). On GPUs each trainer has its own device and NCCL.

{table(["size", "trainer s/step (median)", "end to end s/step (median)", "trained tokens/s",
        "trainer s/step without vLLM"], rows)}

The last column is the same step with no engine beside it (one trainer in process vs two trainer
processes on the shards, one thread each): what the split model costs by itself on these cores, apart
from sharing them with vLLM's two workers.
"""
    write_report("bench_train_tp", args.out, "/train at tensor-parallel size 2 vs 1", body)
    write_results("bench_train_tp", args.out, {"runs": {str(k): v for k, v in runs.items()},
                                               "medians": {str(k): v for k, v in med.items()},
                                               "without_vllm": alone})
    print(body)


if __name__ == "__main__":
    main()
