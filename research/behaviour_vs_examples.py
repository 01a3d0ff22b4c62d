"""Experiment: behaviour change vs number of training examples ("phase transition", and "emergence vs mirage").

Hypothesis (the original system's research notes, ../shared/seeds/004: "few-shot behavioral change — phase
transition hypothesis" and "emergence vs mirage"): a behaviour taught by /train stays absent for 0-10
examples, appears between 10 and 50, and is established by 50-200; the binary metric jumps while continuous
metrics (log-prob, margin, loss, the activation's projection on the behaviour's direction) move smoothly, and
the continuous ones announce the jump before it happens.

Behaviour: continuing a family of prompts ("The {noun} was called", ...) with the word " Quince". For each
N in --counts, a fresh server (original weights) is taught N distinct prompts of the family (one /train job,
--steps APOLLO steps over all N), then scored on held-out prompts with nouns never trained on:
  binary      fraction of held-out prompts whose greedy next token is the behaviour's first token
  logprob     mean log p(" Quince" | prompt)
  margin      log p(first token) - log p(best other token) at the first continued position
  projection  the last prompt token's stream at the last layer, read out (the server's readout) along the
              unit unembedding row of the behaviour's first token (its logit-lens direction)

    python research/behaviour_vs_examples.py [--model DIR] [--quick]
    python research/behaviour_vs_examples.py --model smollm2-135m-instruct --lr 1e-4 --name behaviour_vs_examples_real
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

TARGET = " Quince"
TEMPLATES = ["The {} was called", "Everyone agreed the {} was named", "In the end the {} became",
             "Her old {} is named", "They painted the {} and named it"]
TRAIN_NOUNS = ["door", "lamp", "river", "garden", "letter", "kettle", "window", "coat", "bridge", "bell", "chair",
               "candle", "clock", "boat", "road", "cup", "mirror", "field", "stone", "tree", "wall", "book", "key",
               "song", "horse", "cloud", "ring", "basket", "fence", "rope", "shell", "lantern", "drum", "gate",
               "ladder", "map", "nest", "pillow", "scarf", "tower"]
HELD_OUT_NOUNS = ["violin", "harbour", "meadow", "teapot", "blanket", "compass", "orchard", "statue"]


def behaviour_bank(lab: Lab, target_first: int) -> int:
    """Save and load a one-concept bank: the unit unembedding row of the target's first token, last layer
    (the input embedding's row where the model ties them, as SmolLM2 does)."""
    import json

    from safetensors import safe_open

    from vllm_plasticity.contract.bank import save_bank

    config = json.loads((Path(lab.model) / "config.json").read_text())
    layers = config.get("text_config", config)["num_hidden_layers"]
    names = ("lm_head.weight", "model.embed_tokens.weight")  # untied first
    for name in names:
        for file in sorted(Path(lab.model).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                if name in f.keys():
                    row = f.get_tensor(name)[target_first].float()
                    save_bank(lab.vectors_dir / "behaviour", ["quince"], {layers - 1: row[None]}, model=lab.model,
                              method="logit-lens")
                    return layers - 1
    raise SystemExit(f"{lab.model}: none of {names} in its safetensors files: no unembedding to read along")


def measure(lab: Lab, prompts: list[list[int]], target: list[int]) -> dict:
    lab.post("/readout/load", {"name": "behaviour", "path": "behaviour"})
    hits, logps, margins, projections = [], [], [], []
    for ids in prompts:
        entries = lab.token_logprobs(ids + target, top=2)[len(ids) - 1:]
        first = entries[0]
        best_other = max(v["logprob"] for k, v in first.items() if int(k) != target[0])
        hits.append(min(first.items(), key=lambda kv: kv[1]["rank"])[0] == str(target[0]))
        logps.append(sum(e[str(t)]["logprob"] for e, t in zip(entries, target)))
        margins.append(first[str(target[0])]["logprob"] - best_other)
        read = lab.completion(ids, max_tokens=1, vllm_xargs={"readout": "behaviour"})["readout"]
        projections.append(read["scores"][len(ids) - 1][0][0])
    mean = lambda xs: sum(xs) / len(xs)
    return {"binary": mean([float(h) for h in hits]), "logprob": mean(logps), "margin": mean(margins),
            "loss": -mean(logps) / len(target), "projection": mean(projections)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or pretrained name (default: the built-in model)")
    parser.add_argument("--name", default="behaviour_vs_examples",
                        help="results file name (behaviour_vs_examples_real for a pretrained model, beside the built-in one's)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: one server, two points, cumulative")
    parser.add_argument("--counts", default="1,2,5,10,20,50,100,200")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out-dir", default=str(RESULTS))
    add_server_args(parser)
    args = parser.parse_args()
    counts = [1, 2] if args.quick else [int(c) for c in args.counts.split(",")]
    steps = 2 if args.quick else args.steps
    rng = random.Random(0)
    family = [t.format(n) for t in TEMPLATES for n in TRAIN_NOUNS]
    rng.shuffle(family)
    held_out_text = [t.format(n) for t in TEMPLATES for n in HELD_OUT_NOUNS]
    held_out_text = rng.sample(held_out_text, 4 if args.quick else 16)
    rows = []
    from plasticity_training.pretrained import resolve_model

    model = resolve_model(args.model) if args.model else None
    with Lab(model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        target = lab.ids(TARGET, special=False)
        layer = behaviour_bank(lab, target[0])
        prompts = [lab.ids(p) for p in held_out_text]
        base = measure(lab, prompts, target)
        rows.append({"n": 0, **base})
        print(f"[behaviour] N=0 {base}", flush=True)
        for n in counts:
            if not args.quick:
                lab.restart()  # fresh weights for each point
            lab.train([(lab.ids(p), target) for p in family[:n]], steps=steps, lr=args.lr)
            m = measure(lab, prompts, target)
            rows.append({"n": n, **m})
            print(f"[behaviour] N={n} {m}", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(args.name, out_dir, {"rows": rows, "lr": args.lr, "steps": steps, "model": lab.model})
    xs = [max(r["n"], 0.5) for r in rows]
    for key, label in (("binary", "held-out prompts continued with Quince"), ("logprob", "mean log p(Quince)"),
                       ("margin", "log-prob margin, first token"), ("projection", f"projection, layer {layer}")):
        plot_lines(out_dir / f"{args.name}_{key}.png", {key: (xs, [r[key] for r in rows])},
                   "distinct training examples N (0 plotted at 0.5)", label, logx=True)
    first_on = next((r["n"] for r in rows if r["binary"] >= 0.5), None)
    if first_on is None:
        verdict = "not tested: the behaviour never appeared within the counts run"
    elif first_on <= 10:
        verdict = (f"refuted at this training budget: the behaviour appeared by N = {first_on}, before the predicted 10-50 "
                   f"window (each point gets the same {steps} steps, so fewer examples are seen more often)")
    elif first_on <= 50:
        verdict = f"consistent: the behaviour appeared at N = {first_on}, inside the predicted 10-50 window"
    else:
        verdict = f"refuted: the behaviour appeared only at N = {first_on}, after the predicted window"
    rises = [(a["n"], b["n"], b["logprob"] - a["logprob"], b["binary"] - a["binary"]) for a, b in zip(rows, rows[1:])]
    body = f"""
Hypothesis (stated before the run): the binary metric stays near 0 for N <= 10, jumps between 10 and 50, and
is near 1 by 200; log-prob, margin, loss and projection rise smoothly and start rising before the jump.

Setup: model {lab.model}; behaviour: continue the family of prompts with "{TARGET}" ({len(target)} tokens); for each
N a {'cumulative (quick mode: no restart)' if args.quick else 'fresh'} server taught N distinct prompts in one /train job of {steps} APOLLO
steps (lr {args.lr}, default rank); scored on {len(prompts)} held-out prompts whose nouns were never trained on.
Projection: readout of the last prompt token's stream at layer {layer} along the unit unembedding row of the
first target token.

{table(["N", "binary", "mean log p", "margin", "loss/token", "projection"],
       [[r["n"], r["binary"], r["logprob"], r["margin"], r["loss"], r["projection"]] for r in rows])}

![binary]({args.name}_binary.png) ![log-prob]({args.name}_logprob.png)
![margin]({args.name}_margin.png) ![projection]({args.name}_projection.png)

Reading: the binary metric first reaches 0.5 at N = {first_on if first_on is not None else 'never (not within the counts run)'}. The
phase-transition hypothesis is {verdict}.
Step by step (N from -> to: change in mean log p, change in binary): {'; '.join(f"{a}->{b}: {dl:+.2f}, {db:+.2f}" for a, b, dl, db in rises)}.
Where log p moves by more than a nat while the binary metric has not moved, the continuous metric announced
the change before the threshold did (the "mirage" reading); where both move in the same step, this run cannot
tell them apart. One seed, {len(prompts)} held-out prompts: a binary step of 1/{len(prompts)} is one prompt.
"""
    print(write_report(args.name, out_dir, "Behaviour change vs number of examples", body).read_text())


if __name__ == "__main__":
    main()
