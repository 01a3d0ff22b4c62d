"""Why SYNTHE stays at chance on the memory tasks (research/memory_tasks_results.md): one change at a time.

memory_tasks.py trains every architecture for the same budget (400 AdamW steps, batch 16, lr 3e-3, spans
4-32) and SYNTHE alone ends at chance (loss plateau ~2.1, the others 0.8-1.4) although its forward equals
the reference's. This script trains the same SYNTHE (memory_tasks.build("synthe"): d_model 64, 2 blocks,
probe window 32 gated causally, router from block 1) with one setting changed per variant, in-process
(the served forward equals this one: tests/test_synthe*.py), and records per variant:
  - the loss curve and top-1 accuracy on held-out copy_memory / selective_copy / induction at spans 8 and 32;
  - at the start and the end, how often each block's probe fires on task text and the router's mean budget
    (the factor every token's stream is multiplied by after block 1);
  - at the start, each part's share of the gradient norm.
A Llama of the benchmark's shape (memory_tasks.build("llama")) trains beside them as the bar.

    python research/synthe_memory.py [--quick] [--variants a,b] [--seeds 2] [--jobs 2] [--out-dir research/results]

Writes synthe_memory.md, synthe_memory.json and synthe_memory_loss.png.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_checkpoint import command, machine  # noqa: E402  (the benchmarks' shared report header)
from memory_tasks import OFFLINE_TASKS, SYNTHE_SPEC, batch_loss, build, load, train_offline  # noqa: E402

from plasticity_training.memory_tasks import make  # noqa: E402

# name -> (what changes, config fields it sets, SyntheSpec fields it sets (the build), training settings).
# "as benchmarked" first; "+" combines.
NO_HUB = {"memory_hub": False}
NO_ROUTER = {"min_depth": 2}  # the benchmark's SYNTHE has 2 blocks: the router scales none
PYTORCH_INIT = {"reference_init": False}
ALWAYS_128 = {"probe_gate": "always", "probe_window": 128}
VARIANTS: dict[str, tuple[str, dict, dict, dict]] = {
    "as benchmarked": ("memory_tasks.py's SYNTHE and budget", {}, {}, {}),
    "probe always": ("the attention probe adds its output at every token", {"probe_gate": "always"}, {}, {}),
    "probe always + window 128": ("... over 128 tokens instead of 32 (every sample fits)", ALWAYS_128, {}, {}),
    "probe never": ("no attention probe: the recurrences alone", {"probe_gate": "never"}, {}, {}),
    "no router": ("no depth router: the stream is never scaled by the budget", NO_ROUTER, {}, {}),
    "no hub": ("the memory hub adds nothing (memory_hub: false)", NO_HUB, {}, {}),
    "PyTorch init": ("PyTorch's default initialisation instead of the reference's N(0, 0.02)", {}, PYTORCH_INIT, {}),
    "lr 1e-2": ("3.3x the learning rate", {}, {}, {"lr": 1e-2}),
    "lr 1e-3": ("a third of the learning rate", {}, {}, {"lr": 1e-3}),
    "3x steps": ("three times the training budget", {}, {}, {"steps_factor": 3}),
    "PyTorch init + no router": ("two of the three (the hub kept)", NO_ROUTER, PYTORCH_INIT, {}),
    "no hub + PyTorch init": ("two of the three (the router kept)", NO_HUB, PYTORCH_INIT, {}),
    "no hub + no router": ("two of the three (the reference's initialisation kept)", {**NO_HUB, **NO_ROUTER}, {}, {}),
    "no hub + PyTorch init + no router": ("all three", {**NO_HUB, **NO_ROUTER}, PYTORCH_INIT, {}),
    "no hub + PyTorch init + no router + probe always + window 128": (
        "all three, the probe attending at every token over every sample", {**NO_HUB, **NO_ROUTER, **ALWAYS_128},
        PYTORCH_INIT, {}),
    "no hub + PyTorch init + no router + 3x steps": ("all three, three times the budget", {**NO_HUB, **NO_ROUTER},
                                                     PYTORCH_INIT, {"steps_factor": 3}),
}
BASELINE = "llama"
SPANS = (8, 32)


def settings(quick: bool) -> dict:
    if quick:
        return dict(steps=6, batch=4, train_span=16, eval_samples=4, diag_samples=4)
    return dict(steps=400, batch=16, train_span=32, eval_samples=32, diag_samples=16)


def synthe_variant(fields: dict, spec: dict, out: Path, seed: int = 0) -> Path:
    """The benchmark's random-init SYNTHE (memory_tasks.SYNTHE_SPEC, with `spec` over it) with `fields`
    written over its config's (none of them changes a weight's shape)."""
    from plasticity_training.default_model import build_model
    from plasticity_training.default_synthe import SyntheSpec

    model_dir = build_model(SyntheSpec(**{**SYNTHE_SPEC, **spec, "seed": seed}), out, text="", log=lambda m: None)
    config = json.loads((model_dir / "config.json").read_text())
    config["synthe"].update(fields)
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))
    return model_dir


def padded(samples) -> torch.Tensor:
    """The samples' ids right-padded into one (R, T) batch (the same layout as batch_loss)."""
    ids = torch.zeros(len(samples), max(len(s.ids) for s in samples), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
    return ids


def accuracy(model, samples) -> float:
    """Top-1 at the scored positions, one right-padded forward."""
    with torch.no_grad():
        predicted = model(input_ids=padded(samples)).logits.argmax(-1)
    hits = [int(predicted[i, p - 1]) == s.ids[p] for i, s in enumerate(samples) for p in s.scored]
    return sum(hits) / len(hits)


def task_batch(rng: random.Random, n: int, span: int):
    return [make(task, rng, span) for task in OFFLINE_TASKS for _ in range(n)]


def gates_and_budget(model, samples) -> dict:
    """Per block, the fraction of task tokens the probe fires on, and the router's mean budget."""
    ids = padded(samples)
    with torch.no_grad():
        out, _ = model.stream(ids, model.zero_states(len(samples), ids.device), signals=True)
    names, d = model.signal_names(), model.synthe.d_model
    column = lambda name: out[..., d + names.index(name)].float()
    blocks = range(model.synthe.n_blocks)
    return {"probe": [round(column(f"probe/{b}").mean().item(), 3) for b in blocks],
            "budget": [round(column(f"router_budget/{b}").mean().item(), 3) for b in blocks]}


def gradient_shares(model, samples) -> dict:
    """Each part's share of the squared gradient norm of one batch's loss (parts: top-level module, and
    within each block, its layer)."""
    model.zero_grad(set_to_none=True)
    batch_loss(model, samples).backward()
    parts: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        bits = name.split(".")
        part = ".".join(bits[:3]) if bits[0] == "blocks" else bits[0]
        parts[part] = parts.get(part, 0.0) + p.grad.float().pow(2).sum().item()
    model.zero_grad(set_to_none=True)
    total = sum(parts.values()) or 1.0
    return {k: round(v / total, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}


def run_variant(job: tuple[str, int, dict, str]) -> dict:
    """Build, diagnose, train and score one variant from one seed (the weights' draw and the samples')."""
    name, seed, cfg, work = job
    torch.set_num_threads(1)  # --jobs variants share the cores
    torch.manual_seed(seed)
    out = Path(work) / f"{name.replace(' ', '_').replace('+', '')}-{seed}"
    if name == BASELINE:
        fields, train = {}, {}
        model = load(build("llama", out, seed=seed))
    else:
        _, fields, spec, train = VARIANTS[name]
        model = load(synthe_variant(fields, spec, out, seed=seed))
    diag = task_batch(random.Random(3), cfg["diag_samples"], cfg["train_span"])
    synthe = name != BASELINE
    start = gates_and_budget(model, diag) if synthe else None
    shares = gradient_shares(model, diag)
    steps = cfg["steps"] * int(train.get("steps_factor", 1))
    history: list[float] = []
    t0 = time.monotonic()
    train_offline(model, {**cfg, "steps": steps}, seed=1000 + seed, log=lambda m: None, lr=train.get("lr", 3e-3),
                  history=history)
    seconds = time.monotonic() - t0
    rng = random.Random(2)  # the same held-out samples for every variant and seed
    table = {task: {span: accuracy(model, [make(task, rng, span) for _ in range(cfg["eval_samples"])])
                    for span in SPANS} for task in OFFLINE_TASKS}
    end = gates_and_budget(model, diag) if synthe else None
    print(f"[synthe-memory] {name} (seed {seed}): final loss {sum(history[-20:]) / len(history[-20:]):.3f}, {json.dumps(table)}",
          flush=True)
    return {"name": name, "seed": seed, "params": sum(p.numel() for p in model.parameters()), "steps": steps,
            "seconds": round(seconds, 1), "history": history, "table": table, "start": start, "end": end,
            "gradient_shares": shares, "fields": fields, "train": train}


def plot(results: dict, out_dir: Path) -> str:
    """Each variant's loss curve (seed 0), smoothed; the Llama dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, runs in results.items():
        h = runs[0]["history"]
        k = max(1, len(h) // 40)  # smoothed over k steps
        smooth = [sum(h[i:i + k]) / len(h[i:i + k]) for i in range(0, len(h), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth, label=name, linestyle="--" if name == BASELINE else "-")
    ax.set_xlabel("AdamW step")
    ax.set_ylabel("loss on the scored tokens (seed 0)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    path = "synthe_memory_loss.png"
    fig.savefig(out_dir / path, dpi=110)
    plt.close(fig)
    return path


def final_loss(run: dict) -> float:
    tail = run["history"][-20:]
    return sum(tail) / len(tail)


def mean_accuracy(run: dict) -> float:
    cells = [v for row in run["table"].values() for v in row.values()]
    return sum(cells) / len(cells)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report(results: dict, cfg: dict, seeds: int, plot_path: str, quick: bool, run_command: str) -> str:
    """results: name -> one run per seed."""
    names = [n for n in results if n != BASELINE]
    header = " | ".join(f"{t.replace('_', ' ')} {s}" for t in OFFLINE_TASKS for s in SPANS)
    acc = {n: mean(mean_accuracy(r) for r in runs) for n, runs in results.items()}
    loss = {n: mean(final_loss(r) for r in runs) for n, runs in results.items()}
    rows = []
    for name, runs in results.items():
        what = "the bar: the benchmark's Llama" if name == BASELINE else VARIANTS[name][0]
        cells = " | ".join(f"{mean(r['table'][t][s] for r in runs):.2f}" for t in OFFLINE_TASKS for s in SPANS)
        spread = ", ".join(f"{mean_accuracy(r):.2f}" for r in runs)
        losses = ", ".join(f"{final_loss(r):.2f}" for r in runs)
        rows.append(f"| {name} | {what} | {runs[0]['steps']} | {losses} | {cells} | {acc[name]:.2f} ({spread}) |")
    diag_rows = []
    for name in names:
        run = results[name][0]
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(run["gradient_shares"].items())[:4])
        diag_rows.append(f"| {name} | {run['start']['probe']} -> {run['end']['probe']} | "
                         f"{run['start']['budget']} -> {run['end']['budget']} | {top} |")
    noise = (0.15 * 0.85 / (cfg["eval_samples"] * 6)) ** 0.5
    reading = []
    if "as benchmarked" in results and names:
        best = max(names, key=acc.get)
        bar = f" and the Llama's {acc[BASELINE]:.2f} / {loss[BASELINE]:.3f}" if BASELINE in acc else ""
        reading.append(f"Best variant: **{best}**, mean accuracy {acc[best]:.2f} (final loss {loss[best]:.3f}) against "
                       f"{acc['as benchmarked']:.2f} / {loss['as benchmarked']:.3f} as benchmarked{bar}.")
        learned = [n for n in names if acc[n] - acc["as benchmarked"] > 2 * noise]
        reading.append("Above the benchmarked SYNTHE by more than the noise (" + f"{2 * noise:.2f}): "
                       + (", ".join(f"{n} ({acc[n]:.2f})" for n in learned) if learned else "none") + ".")
    return f"""# Why SYNTHE stays at chance on the memory tasks{' (--quick: a smoke run, not a finding)' if quick else ''}

Machine: {machine()}. Command: `{run_command}`.

Setup: the SYNTHE of research/memory_tasks.py (d_model 64, 2 blocks, probe window 32 gated causally, the
router scaling block 1, the reference's N(0, 0.02) initialisation), trained in-process as that benchmark
trains it ({cfg['steps']} AdamW steps unless the variant says otherwise, batch {cfg['batch']}, lr 3e-3,
gradient clip 1, loss on the scored tokens of copy_memory, selective_copy, induction with spans
4-{cfg['train_span']}); one setting changed per variant, "+" combines. {seeds} seed(s) per variant (each
seed draws the weights and the training samples). Accuracy: top-1 at the scored positions on {cfg['eval_samples']} held-out
samples per cell, mean over seeds (chance: 1/8 per token for the copies, 1/14 for induction). Final loss: the
mean of the last 20 steps, per seed. The served forward equals this in-process one (tests/test_synthe.py).

| variant | what changes | steps | final loss per seed | {header} | mean (per seed) |
| --- | --- | --- | --- | {' | '.join('---' for _ in OFFLINE_TASKS for _ in SPANS)} | --- |
{chr(10).join(rows)}

![loss]({plot_path})

Diagnostics (seed 0) on {cfg['diag_samples']} samples per task (span {cfg['train_span']}), at the start -> the end of
training: per block, the fraction of tokens the probe adds its output on and the router's mean budget (the
factor the stream is multiplied by after the block; 1 where the router does not act); the four parts with
the largest share of the first batch's squared gradient norm.

| variant | probe fires (block 0, 1) | router budget (block 0, 1) | gradient norm share at the start |
| --- | --- | --- | --- |
{chr(10).join(diag_rows)}

Reading (computed from the tables):
{chr(10).join('- ' + r for r in reading)}

A mean accuracy difference below about {2 * noise:.2f} is within the held-out samples' noise; the spread over
seeds shows how much one training run varies.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tests): a few steps, a few samples")
    parser.add_argument("--variants", default=",".join([BASELINE, *VARIANTS]),
                        help=f"comma-separated, of: {BASELINE}, {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", type=int, default=2, help="runs per variant, seeds 0..N-1")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n != BASELINE and n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (known: {BASELINE}, {', '.join(VARIANTS)})")
    cfg = settings(args.quick)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, seed, cfg, tmp) for n in names for seed in range(args.seeds)]
        if args.jobs > 1:
            with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
                done = pool.map(run_variant, jobs, chunksize=1)
        else:
            done = [run_variant(j) for j in jobs]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for run in done:
        results[run.pop("name")].append(run)
    plot_path = plot(results, out_dir)
    text = report(results, cfg, args.seeds, plot_path, args.quick, command())
    (out_dir / "synthe_memory.md").write_text(text)
    (out_dir / "synthe_memory.json").write_text(json.dumps({"settings": cfg, "seeds": args.seeds, "results": results,
                                                            "command": command()}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
