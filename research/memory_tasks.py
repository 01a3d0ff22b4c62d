"""Benchmark: the four memory tasks (training/plasticity_training/memory_tasks.py) across the architectures
the project serves, scored through `plasticity serve`, and learned online through /train.

For each architecture (a Llama of the built-in layout, the decepticons causal bank, Transformer Killer Core
with its GRU backbone and with its Mamba2 backbone (vLLM's MambaMixer2 when served), SYNTHE with its probe
gated causally as the reference builds it, and SYNTHE with the settings it needs to learn these tasks from
scratch (`synthe-learnable`: no memory hub, no router, PyTorch's initialisation; synthe_memory.py);
parameter counts printed, matched to within about 1.7x: SYNTHE's probe needs head size 32):
  1. train a small model offline (next-token loss on the scored positions) on copy_memory, selective_copy and
     induction with memory spans drawn from [4, --train-span];
  2. serve it (`plasticity serve --training`) and score top-1 accuracy through the server (prompt_logprobs)
     on held-out samples of every task at growing spans (--spans; spans beyond --train-span test whether the
     memory generalises past what training showed);
  3. teach it the held-out task, assoc_recall, online: rounds of POST /train (fresh samples each round) and
     the task's accuracy on held-out samples after each round, through the same server.
Writes research/memory_tasks_results.md and memory_tasks_accuracy.png, memory_tasks_online.png.

    python research/memory_tasks.py [--quick] [--out-dir research] [--archs A,B --keep-others]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from lab import QUICK_SERVER_ARGS  # noqa: E402

from plasticity_training.memory_tasks import TASKS, Sample, make  # noqa: E402
from vllm_plasticity.launcher import ServerProcess  # noqa: E402

OFFLINE_TASKS = ("copy_memory", "selective_copy", "induction")
ONLINE_TASK = "assoc_recall"
SYNTHE_SPEC = dict(d_model=64, wiener_state_dim=8, tier_dims=(32, 16, 8), train_steps=0)  # SyntheSpec's fields
# What SYNTHE needs to learn these tasks from scratch (research/results/synthe_memory.md): no memory hub, no
# router, PyTorch's initialisation instead of the reference's N(0, 0.02).
SYNTHE_LEARNABLE = dict(memory_hub=False, min_depth=2, reference_init=False)
SERVER_ARGS = ["--dtype", "float32", "--max-num-seqs", "32", "--max-model-len", "512"]


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=8, batch=8, train_span=16, spans=[8, 16], eval_samples=8, rounds=2, round_steps=2,
                    round_samples=4, server_args=QUICK_SERVER_ARGS)
    return dict(steps=400, batch=16, train_span=32, spans=[8, 32, 64, 128], eval_samples=32, rounds=8,
                round_steps=5, round_samples=16, server_args=[])


# ---- the models ------------------------------------------------------------------------------------------

def build(arch: str, out: Path, seed: int = 0) -> Path:
    """A random-init model directory of `arch` with about 0.1-0.2M parameters and byte-sized vocabulary,
    initialised from `seed`."""
    from plasticity_training.default_model import ModelSpec, build_model

    if arch == "llama":
        return build_model(ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                     max_position_embeddings=512, train_steps=0, seed=seed), out, log=lambda m: None)
    if arch == "causal-bank":
        from plasticity_training.default_causal_bank import CausalBankSpec

        return build_model(CausalBankSpec(train_steps=0, linear_hidden=(128,), seed=seed), out, text="", log=lambda m: None)
    if arch in ("synthe", "synthe-learnable"):
        from plasticity_training.default_synthe import SyntheSpec

        settings = SYNTHE_LEARNABLE if arch == "synthe-learnable" else {}
        return build_model(SyntheSpec(**SYNTHE_SPEC, **settings, seed=seed), out, text="", log=lambda m: None)
    from plasticity_training.default_tkc import TKCSpec

    backbone = "mamba2" if arch == "tkc-mamba2" else "gru"
    return build_model(TKCSpec(d_model=80, mem_slots=32, train_steps=0, backbone=backbone, mamba_d_state=32,
                               mamba_headdim=32, seed=seed), out, text="", log=lambda m: None)


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def batch_loss(model, samples: list[Sample]) -> torch.Tensor:
    """Mean cross-entropy of the scored tokens, one right-padded forward."""
    T = max(len(s.ids) for s in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    target = torch.full((len(samples), T), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        for p in s.scored:
            target[i, p] = s.ids[p]
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)


def train_offline(model, cfg: dict, seed: int, log, lr: float = 3e-3, history: list[float] | None = None) -> float:
    """AdamW on the offline tasks for cfg["steps"] steps; returns the last loss (each step's in `history`)."""
    rng, params = random.Random(seed), [p for n, p in model.named_parameters()
                                        if n not in getattr(model, "frozen_parameters", ())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(cfg["steps"]):
        samples = [make(rng.choice(OFFLINE_TASKS), rng, rng.randint(4, cfg["train_span"])) for _ in range(cfg["batch"])]
        loss = batch_loss(model, samples)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if history is not None:
            history.append(loss.item())
        if step % 100 == 0 or step == cfg["steps"] - 1:
            log(f"    step {step + 1}/{cfg['steps']} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


# ---- through the server --------------------------------------------------------------------------------------

def accuracy(server: ServerProcess, model: str, samples: list[Sample]) -> float:
    """Top-1 accuracy on the scored positions, from the server's prompt_logprobs (one batched request)."""
    r = requests.post(server.url + "/v1/completions", timeout=1200, json={
        "model": model, "prompt": [s.ids for s in samples], "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1})
    r.raise_for_status()
    hits = total = 0
    for s, choice in zip(samples, sorted(r.json()["choices"], key=lambda c: c["index"])):
        for p in s.scored:
            top = min(choice["prompt_logprobs"][p].items(), key=lambda kv: kv[1]["rank"])[0]
            hits += int(top) == s.ids[p]
            total += 1
    return hits / total


def run_arch(arch: str, cfg: dict, work: Path, log) -> dict:
    log(f"[memory-tasks] {arch}: building and training offline")
    model_dir = build(arch, work / arch)
    model = load(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.monotonic()
    final_loss = train_offline(model, cfg, seed=1, log=log)
    train_seconds = time.monotonic() - t0
    model.save_pretrained(model_dir)
    args = [*SERVER_ARGS, *cfg["server_args"], "--training", "--state-dir", str(work / f"state-{arch}")]
    server = ServerProcess.plasticity(model_dir, extra_args=args, log_path=work / f"{arch}.log")
    try:
        server.wait_ready()
        rng = random.Random(2)
        table = {task: {span: accuracy(server, str(model_dir), [make(task, rng, span) for _ in range(cfg["eval_samples"])])
                        for span in cfg["spans"]} for task in TASKS}
        log(f"[memory-tasks] {arch}: {json.dumps(table)}")
        held_out = [make(ONLINE_TASK, rng, 24) for _ in range(cfg["eval_samples"])]
        online = [(0, accuracy(server, str(model_dir), held_out))]
        for r in range(cfg["rounds"]):
            batch = [make(ONLINE_TASK, rng, 24) for _ in range(cfg["round_samples"])]
            job = requests.post(server.url + "/train", timeout=1200, json={
                "samples": [{"context_ids": s.context, "continuation_ids": s.continuation} for s in batch],
                "steps": cfg["round_steps"], "optimizer": {"lr": 3e-3}}).json()
            online.append((online[-1][0] + job["steps"], accuracy(server, str(model_dir), held_out)))
        log(f"[memory-tasks] {arch}: online {online}")
    finally:
        server.stop()
    return {"params": n_params, "final_loss": final_loss, "train_seconds": train_seconds, "table": table, "online": online}


# ---- report ------------------------------------------------------------------------------------------------

def plot(results: dict, cfg: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.2), sharey=True)
    for ax, task in zip(axes, TASKS):
        for arch, res in results.items():
            ax.plot(cfg["spans"], [res["table"][task][s] for s in cfg["spans"]], marker="o", label=arch)
        ax.axvline(cfg["train_span"], color="#999", linestyle=":", linewidth=1)
        ax.set_title(task + (" (never trained offline)" if task == ONLINE_TASK else ""), fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory span (delay / length)")
    axes[0].set_ylabel("top-1 accuracy (served)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    names = ["memory_tasks_accuracy.png", "memory_tasks_online.png"]
    fig.savefig(out_dir / names[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for arch, res in results.items():
        ax.plot(*zip(*res["online"]), marker="o", label=arch)
    ax.set_xlabel("/train steps on the served model")
    ax.set_ylabel(f"{ONLINE_TASK} accuracy (held out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / names[1], dpi=110)
    plt.close(fig)
    return names


def report(results: dict, cfg: dict, plots: list[str], quick: bool, run_command: str) -> str:
    spans = cfg["spans"]
    rows = [f"| {arch} | {res['params'] / 1e6:.2f}M | {task} | " + " | ".join(f"{res['table'][task][s]:.2f}" for s in spans) + " |"
            for task in TASKS for arch, res in results.items()]
    online_rows = [f"| {arch} | " + ", ".join(f"{steps}: {acc:.2f}" for steps, acc in res["online"]) + " |"
                   for arch, res in results.items()]
    long_span = spans[-1]
    best = {task: max(results, key=lambda a: results[a]["table"][task][long_span]) for task in TASKS}
    n = cfg["eval_samples"]
    online = {arch: (res["online"][0][1], res["online"][-1][1], max(a for _, a in res["online"])) for arch, res in results.items()}
    noise = (0.15 * 0.85 / n) ** 0.5  # the standard error of one accuracy near chance, from n held-out samples
    chance = {"copy_memory": 1 / 8, "selective_copy": 1 / 8, "assoc_recall": 1 / 7, "induction": 1 / 14}
    unlearned = [t for t in TASKS if all(v <= chance[t] + 2 * noise for res in results.values() for v in res["table"][t].values())]
    return f"""# Memory tasks across architectures, scored through the server{' (--quick: a smoke run, not a finding)' if quick else ''}

Question: on the four synthetic memory tasks of Transformer Killer Core's seed, how do the architectures the
project serves compare as the memory span grows, and does a served model learn a new task online via /train?

Machine: {machine()}. Command: `{run_command}`.
Setup: vocabulary 16 (task format in training/plasticity_training/memory_tasks.py), models random-init then
trained offline for {cfg['steps']} AdamW steps (batch {cfg['batch']}, lr 3e-3, loss on the scored tokens) on
{', '.join(OFFLINE_TASKS)} with spans drawn from [4, {cfg['train_span']}] (dotted line in the plot); served with
`plasticity serve --training` (fp32); accuracy = top-1 of the server's prompt_logprobs at the scored positions,
{cfg['eval_samples']} held-out samples per cell. Offline training time: {', '.join(f"{a} {r['train_seconds']:.0f}s" for a, r in results.items())}.

| architecture | parameters | task | {' | '.join(f'span {s}' for s in spans)} |
| --- | --- | --- | {' | '.join('---' for _ in spans)} |
{chr(10).join(rows)}

![accuracy vs span]({plots[0]})

Online: {ONLINE_TASK} (never seen offline), {cfg['rounds']} rounds of POST /train with {cfg['round_samples']} fresh samples
and {cfg['round_steps']} steps each (APOLLO, lr 3e-3), held-out accuracy through the server after each round
(/train steps: accuracy):

| architecture | accuracy after N /train steps |
| --- | --- |
{chr(10).join(online_rows)}

![online learning]({plots[1]})

Reading (what this run shows, for these tiny models and this training budget):
- Best at span {long_span} per task: {', '.join(f"{t} {best[t]} ({results[best[t]]['table'][t][long_span]:.2f})" for t in TASKS)}.
  Chance is 1/8 for the copies, 1/7 for recall (7 values), 1/14 for induction; with {n} held-out samples one
  accuracy near chance has a standard error of about {noise:.2f}, so differences below about {2 * noise:.2f} are noise.
- Copy and selective copy are where the memory shows: a cell well above chance at spans past the training
  range ({cfg['train_span']}) means the model carries the content across a gap it never saw in training.
  {(', '.join(unlearned) + ' stayed within noise of chance for every architecture at every span: none learned it at this budget.') if unlearned else 'Every task was learned above chance by at least one architecture.'}
- Online (/train on the served model, {ONLINE_TASK}): {'; '.join(f"{a} {o[0]:.2f} -> {o[1]:.2f} (best {o[2]:.2f})" for a, o in online.items())}.
  Read against the noise above: a change smaller than about {2 * noise:.2f} is not learning.
These are 0.1-0.2M-parameter models trained for seconds to a minute on 2 CPU cores: the table ranks what they
learned in that budget, not the architectures' ceilings. The same script takes larger budgets (edit
`settings`) and a GPU.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI): tiny training, two spans")
    parser.add_argument("--archs", default="llama,causal-bank,tkc,tkc-mamba2,synthe,synthe-learnable")
    parser.add_argument("--keep-others", action="store_true",
                        help="merge this run's architectures into the saved results instead of replacing them")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved JSON")
    args = parser.parse_args()
    cfg = settings(args.quick)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    log = lambda m: print(m, flush=True)
    if args.report_only:
        saved = json.loads((out_dir / "memory_tasks_results.json").read_text())  # written by a full run
        cfg, results = saved["settings"], saved["results"]
        for res in results.values():  # JSON keys are strings
            res["table"] = {t: {int(k): v for k, v in row.items()} for t, row in res["table"].items()}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = {arch: run_arch(arch, cfg, Path(tmp), log) for arch in args.archs.split(",")}
    run_command = saved.get("command", "python research/memory_tasks.py") if args.report_only else command()
    if args.keep_others and not args.report_only:
        saved = json.loads((out_dir / "memory_tasks_results.json").read_text())
        if saved["settings"] != cfg:
            raise SystemExit("--keep-others: the saved results were run with other settings; run them all again")
        for res in saved["results"].values():
            res["table"] = {t: {int(k): v for k, v in row.items()} for t, row in res["table"].items()}
        results = {**saved["results"], **results}
        run_command = f"{saved['command']}; then {run_command}"
    plots = plot(results, cfg, out_dir)
    text = report(results, cfg, plots, args.quick, run_command)
    (out_dir / "memory_tasks_results.md").write_text(text)
    if not args.report_only:
        (out_dir / "memory_tasks_results.json").write_text(json.dumps({"settings": cfg, "results": results,
                                                                       "command": run_command}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
