"""Experiment: is a steering vector the prototype of training? (../shared/seeds/004: "steering vectors —
prototype behavioral changes before training")

Hypothesis: training on text the steered model wrote moves the unsteered model's activations along the
steering vector (the mean activation change has a clearly positive cosine with it, far above a random
direction's ~1/sqrt(hidden)), and the trained model, unsteered, shows part of what the steered model showed
(its outputs project onto the concept more than the original model's plain outputs do).

Method, all through the server: (1) a concept vector ("joyful" at layer --layer) by difference of means over
amygdala_stories texts, read from the served model's own stream (readout of the raw coordinates); (2)
continuations of neutral prompts, plain and steered (coef --coef); (3) /train on (prompt, steered
continuation); (4) the stream change on the prompts (after - before, same tokens, unsteered) vs the vector;
the trained model's plain continuations; (5) a fresh server (original weights) scores every set of
continuations by their mean projection on the vector.

    python research/steering_vs_training.py [--model DIR] [--quick]
    python research/steering_vs_training.py --model smollm2-135m-instruct --layer 15 --coef 40 --lr 1e-4 \
        --tokens 24 --name steering_vs_training_real
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

PROMPTS = ["The morning after the meeting, she", "He opened the envelope and", "On the train home they",
           "The kitchen was quiet when", "At the end of the week the team", "My neighbour knocked and",
           "The letter from the bank said", "When the rain stopped, the children"]
HELD_OUT = ["After the long drive, my father", "The shop on the corner was", "Before the guests arrived, we",
            "The phone rang twice and"]  # never trained on: where the trained model is compared
CONCEPT = "joyful"


def raw_streams(lab: Lab, texts_ids: list[list[int]], layer: int, hidden: int) -> list[torch.Tensor]:
    """Each text's stream at `layer` (T-1, hidden): readout of the standard basis (raw coordinates)."""
    lab.post("/readout/load", {"name": "raw", "basis": [0, hidden], "layers": [layer]})
    out = []
    for ids in texts_ids:
        read = lab.completion(ids, max_tokens=1, vllm_xargs={"readout": "raw"})["readout"]
        out.append(torch.tensor(read["scores"])[:, 0, :])
    return out


def projection(lab: Lab, prompt_ids: list[int], continuation: list[int]) -> float:
    """Mean readout score on the concept over the continuation's tokens (the server's current weights)."""
    read = lab.completion(prompt_ids + continuation, max_tokens=1, vllm_xargs={"readout": "concept"})["readout"]
    scores = [row[0][0] for row in read["scores"]][len(prompt_ids) - 1:]
    return sum(scores) / max(1, len(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory or pretrained name (default: the built-in model)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--name", default="steering_vs_training",
                        help="results file name (steering_vs_training_real for a pretrained model, beside the built-in one's)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: two prompts, two steps, no rescoring server")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--coef", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out-dir", default=str(RESULTS))
    add_server_args(parser)
    args = parser.parse_args()
    from plasticity_training.corpus import load_corpus
    from plasticity_training.default_model import REPO_ROOT
    from vllm_plasticity.contract.bank import save_bank

    prompts, held_out = (PROMPTS[:1], HELD_OUT[:1]) if args.quick else (PROMPTS, HELD_OUT)
    steps, n_tok = (2, 4) if args.quick else (args.steps, args.tokens)
    corpus = load_corpus(REPO_ROOT / "amygdala_stories")
    rng = random.Random(0)
    positives = [corpus.texts[i].text for i in corpus.positives(CONCEPT)]
    negatives = rng.sample([corpus.texts[i].text for i in corpus.negatives(CONCEPT)], 4 if args.quick else 24)
    from plasticity_training.pretrained import resolve_model

    model = resolve_model(args.model) if args.model else None
    with Lab(model, quick=args.quick, server=args.server, api_key=args.api_key) as lab:
        hidden = int(lab.post("/readout/load", {"name": "probe", "basis": [0, 1], "layers": [args.layer]})["hidden_size"])
        streams = raw_streams(lab, [lab.ids(t)[:256] for t in positives + negatives], args.layer, hidden)
        means = torch.stack([s.mean(0) for s in streams])
        vector = means[: len(positives)].mean(0) - means[len(positives):].mean(0)
        unit = vector / vector.norm()
        save_bank(lab.vectors_dir / "concept", [CONCEPT], {args.layer: vector[None]}, model=lab.model, method="diff-of-means")
        lab.post("/readout/load", {"name": "concept", "path": "concept"})
        prompt_ids, test_ids = [lab.ids(p) for p in prompts], [lab.ids(p) for p in held_out]
        steer = {"steer": ["concept/" + CONCEPT, args.coef]}
        before = raw_streams(lab, test_ids, args.layer, hidden)
        train_steered = [lab.completion(p, max_tokens=n_tok, vllm_xargs=steer)["token_ids"] for p in prompt_ids]
        plain = [lab.completion(p, max_tokens=n_tok)["token_ids"] for p in test_ids]
        steered = [lab.completion(p, max_tokens=n_tok, vllm_xargs=steer)["token_ids"] for p in test_ids]
        job = lab.train(list(zip(prompt_ids, train_steered)), steps=steps, lr=args.lr)
        lab.post("/readout/load", {"name": "concept", "path": "concept"})
        after = raw_streams(lab, test_ids, args.layer, hidden)
        trained = [lab.completion(p, max_tokens=n_tok)["token_ids"] for p in test_ids]
        memorised = sum(lab.completion(p, max_tokens=n_tok)["token_ids"] == c for p, c in zip(prompt_ids, train_steered))
        delta = torch.cat([a - b for a, b in zip(after, before)]).mean(0)
        cosine = float(delta @ unit / delta.norm())
        g = torch.Generator().manual_seed(0)
        random_cos = [float(delta @ (r := torch.randn(hidden, generator=g)) / (delta.norm() * r.norm())) for _ in range(200)]
        if not args.quick:
            lab.restart()  # score every set of continuations with the original weights
        lab.post("/readout/load", {"name": "concept", "path": "concept"})
        proj = {name: sum(projection(lab, p, c) for p, c in zip(test_ids, conts)) / len(test_ids)
                for name, conts in (("plain", plain), ("steered", steered), ("trained, unsteered", trained))}
        same = sum(t == c for t, c in zip(trained, steered))
        decode = lambda ids: lab.tok.decode(ids)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(args.name, out_dir, {"projection": proj, "cosine": cosine, "losses": job["losses"],
                                               "memorised": memorised, "same_as_steered": same})
    plot_lines(out_dir / f"{args.name}.png", {"mean projection": ([0, 1, 2], list(proj.values()))},
               "0 plain, 1 steered, 2 trained (unsteered)", f"projection on {CONCEPT}, layer {args.layer}")
    spread = sorted(abs(c) for c in random_cos)[int(0.95 * len(random_cos))]
    span = proj["steered"] - proj["plain"]
    gap = f"{(proj['trained, unsteered'] - proj['plain']) / span:.0%}" if abs(span) > 1e-6 else "none (steering moved nothing)"
    examples = "\n".join(f"| {p} | {decode(a)!r} | {decode(b)!r} | {decode(c)!r} |"
                         for p, a, b, c in zip(held_out, plain, steered, trained))
    body = f"""
Hypothesis (stated before the run): the activation change from training on steered text has a clearly positive
cosine with the steering vector (far above a random direction's), and the trained model, unsteered, projects
onto the concept more than the original plain model.

Setup: model {lab.model}; concept "{CONCEPT}" at layer {args.layer}: difference of mean streams, {len(positives)} positive texts
vs {len(negatives)} others, read from the server; steering coef {args.coef}; {n_tok} greedy tokens per continuation;
/train on (prompt, steered continuation) for {len(prompts)} neutral prompts: {steps} APOLLO steps, lr {args.lr:g} (losses
{job['losses'][0]:.3f} -> {job['losses'][-1]:.3f}); afterwards the model reproduces {memorised} of those {len(prompts)} steered
continuations verbatim. Everything below is measured on {len(held_out)} held-out prompts never trained on.
{'Quick mode: scored with the trained weights (no fresh server).' if args.quick else 'Projections scored by a fresh server with the original weights.'}

{table(["measure", "value"], [["cosine(mean stream change after training, vector)", cosine],
                              ["95th percentile |cosine| with a random direction", spread],
                              *[[f"mean projection of {k} continuations", v] for k, v in proj.items()],
                              ["held-out: trained continuations equal to the steered ones", f"{same} of {len(held_out)}"]])}

| prompt | plain | steered | trained, unsteered |
| --- | --- | --- | --- |
{examples}

![projections]({args.name}.png)

Reading: on held-out prompts the stream change points along the vector with cosine {cosine:.3f}, against {spread:.3f}
for random directions (95th percentile): {'above' if cosine > spread else 'not above'} chance. The trained model's own continuations
project at {proj['trained, unsteered']:.3f}, against plain {proj['plain']:.3f} and steered {proj['steered']:.3f}: {gap} of the steered-minus-plain
gap ({span:+.3f}) carried into the unsteered weights (a ratio over a gap this size says only as much as the gap).
One model ({Path(lab.model).name}), one concept, {len(held_out)} held-out prompts: a first measurement, not a general law.
"""
    print(write_report(args.name, out_dir, "Steering vector as the prototype of training", body).read_text())


if __name__ == "__main__":
    main()
