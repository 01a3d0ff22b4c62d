"""Experiment: does steering in natural units change a real model's tone, judged by someone else, while the
text stays fluent? (issue: concept vectors that work on a real model, item 6)

Hypothesis of the first run (stated before it, natural unit = one corpus standard deviation along the lda
vector): on SmolLM2-135M-Instruct, steering one mid-depth layer with a calibrated bank's vector raises an
independent sentiment judge's score for positive concepts and lowers it for negative ones, monotonically in
strength; around strength 4-8 natural units the effect reaches 0.3 (VADER compound, mean over the prompts)
before the text degenerates (distinct bigrams below 0.6 of tokens, or perplexity under the unsteered model
above 3x plain). It needed 32 (results/steering_real_lda_std.md).
Hypothesis of this run (natural unit = the concept's texts' mean offset from the corpus mean, the bank's
steer rows; from an in-process probe of four concepts): the negative concepts reach -0.3 at strength 2-4
with perplexity under 2x plain; the positive ones move less than +0.3 at any fluent strength, since plain
text already scores about +0.45.
Hypothesis of the multi-layer run (`--bank` of layers 9, 12, 15, 18, steered at all four; stated before it):
the push spread over four mid layers reaches a given shift at a quarter of the one-layer strength per layer
with less damage (each layer's addition is smaller against its own stream), so the negative concepts pass
at strength 1 and the positive ones move further than at layer 15 alone (at most +0.18 there) but, with
plain text at +0.45, still short of +0.3 while fluent.
Question of the procedural run (`--prompts procedural --bank <the four-layer bank> --layer 15`; no hypothesis
was written down before it): is the judge's ceiling what holds the positive concepts back? On prompts whose
plain replies score near 0 there is room for +0.3; if they still fall short, the ceiling is not the reason.

Method, all through a real `plasticity serve` of the model: (1) `plasticity extract` with the defaults
(pooled, calibrated on the corpus mean, `--layers auto`) writes the bank; (2) >= 20 neutral chat prompts
written for this project (none in the corpus), greedy, NEW_TOKENS tokens, plain and steered with each concept
at each strength (`steer_units: natural`); (3) the judge: VADER's compound score (vaderSentiment, its own
lexicon), mean over prompts, minus plain; fluency: distinct bigrams / tokens and the perplexity of the
steered continuation under the unsteered model (the same server's prompt log-probs, no steering).

    python research/steering_real.py [--model smollm2-135m-instruct] [--quick] [--layer L] [--server URL]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from lab import RESULTS, Lab, add_server_args, plot_lines, table, write_report, write_results

# Neutral requests: everyday, factual, no emotion asked for (written for this project).
PROMPTS = [
    "Describe the walk from a train station to a library.",
    "Write two sentences about a kitchen table.",
    "Tell me about the weather on a Tuesday afternoon.",
    "Describe a bus stop in a small town.",
    "Write a short note to a neighbour about the recycling bins.",
    "Describe what a post office looks like inside.",
    "Tell me about a morning spent sorting papers.",
    "Write two sentences about a bicycle leaning on a fence.",
    "Describe a car park on a Sunday.",
    "Tell me about a meeting that was moved to Thursday.",
    "Describe a shelf of tinned food in a supermarket.",
    "Write a few sentences about a man waiting for a bus.",
    "Describe the hallway of an office building.",
    "Tell me about repainting a garden shed.",
    "Write two sentences about a cup of tea on a desk.",
    "Describe a street after it has been swept.",
    "Tell me about a woman reading a timetable.",
    "Describe a laundrette on a weekday.",
    "Write a short description of a filing cabinet.",
    "Tell me about a delivery van parked outside a shop.",
    "Describe the view from a second-floor window onto a road.",
    "Write two sentences about changing a light bulb.",
]
# Procedural requests: how-to and factual answers, whose plain replies the judge should score near 0 (written
# for this project, before any run on them). The everyday set above gets a reply the judge already scores
# +0.45 on average ("a lovely walk"), which leaves a positive concept little room below the lexicon's ceiling.
PROCEDURAL_PROMPTS = [
    "List the steps to replace a printer cartridge.",
    "Explain how to read a bus timetable.",
    "Give the steps for boiling an egg.",
    "Name the parts of a stapler.",
    "Explain how a library sorts its books by number.",
    "List what to check before posting a parcel.",
    "Explain how to read an electricity meter.",
    "Give the steps to reset a wall clock after a power cut.",
    "Explain what a spreadsheet cell reference is.",
    "List the tools needed to hang a shelf.",
    "Explain how to fold a letter to fit an envelope.",
    "Give the steps to defrost a freezer.",
    "Explain how a ticket barrier at a station works.",
    "List the fields on a standard delivery note.",
    "Explain how to measure a room for carpet.",
    "Give the steps to change a bicycle's inner tube.",
    "Explain what a postcode is used for.",
    "List the steps to back up files to a USB stick.",
    "Explain how to convert centimetres to inches.",
    "Give the steps to descale a kettle.",
    "Explain how a thermostat controls a radiator.",
    "List what a fire extinguisher label tells you.",
]
PROMPT_SETS = {"everyday": PROMPTS, "procedural": PROCEDURAL_PROMPTS}
POSITIVE = ["joyful", "grateful", "hopeful", "calm"]
NEGATIVE = ["sad", "angry", "afraid", "disgusted"]
STRENGTHS = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
NEW_TOKENS = 40
TARGET_SHIFT = 0.3  # the bar on the judge's mean compound score, against plain
MIN_DISTINCT = 0.6  # distinct bigrams / tokens
MAX_PPL_RATIO = 3.0  # perplexity under the unsteered model, against plain


def distinct_bigrams(ids: list[int]) -> float:
    """Distinct bigrams / tokens: 1 for text that never repeats a pair, towards 0 for a loop."""
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / max(1, len(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model directory or a pretrained name")
    parser.add_argument("--bank", help="an extracted bank directory (default: extract one with the defaults)")
    parser.add_argument("--layer", type=int, help="steer only this of the bank's layers (default: all of them)")
    parser.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="everyday",
                        help="the neutral requests: everyday descriptions (default) or procedural how-to questions")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, 1 concept each way, 2 strengths")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="steering_real", help="results file name (a second bank beside the first)")
    add_server_args(parser)
    args = parser.parse_args()
    from plasticity_training.pretrained import resolve_model
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    model = resolve_model(args.model)
    prompts, positive, negative, strengths = PROMPT_SETS[args.prompts], POSITIVE, NEGATIVE, STRENGTHS
    if args.quick:
        prompts, positive, negative, strengths = prompts[:2], POSITIVE[:1], NEGATIVE[:1], STRENGTHS[1:3]
    judge = SentimentIntensityAnalyzer()

    with Lab(model=model, server=args.server, api_key=args.api_key) as lab:
        bank_dir = lab.vectors_dir / "emotions-steering"
        if args.bank:  # the server loads banks from its vectors directory only
            import shutil

            shutil.copytree(args.bank, bank_dir)
        else:
            from plasticity_training.extract import ExtractOptions, run

            run(ExtractOptions(out=str(bank_dir), model=model, progress=False))
        loaded = lab.post("/readout/load", {"name": "emo", "path": bank_dir.name})
        layers = loaded.get("layers") or []
        manifest = json.loads((bank_dir / "readout.json").read_text())
        method = manifest["method"]
        # what strength 1 adds (the contract's natural_steering): the concept's steer row, or s * v without one
        unit = ("each concept's mean offset from the corpus mean (the bank's steer rows)"
                if manifest.get("calibration", {}).get("steer") else "one corpus standard deviation along the readout vector")
        chat = [lab.ids(lab.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=False), special=False) for p in prompts]

        def generate(steer: list | None) -> list[list[int]]:
            body = {"max_tokens": NEW_TOKENS}
            if steer:
                xargs = {"steer": steer, "steer_units": "natural"}
                if args.layer is not None:
                    xargs["steer_layers"] = [args.layer]
                body["vllm_xargs"] = xargs
            out = lab.post("/v1/completions", {"model": lab.model, "prompt": chat, "temperature": 0,
                                               "return_token_ids": True, **body})["choices"]
            return [c["token_ids"] for c in sorted(out, key=lambda c: c["index"])]

        def measure(outputs: list[list[int]]) -> dict:
            texts = [lab.tok.decode(ids, skip_special_tokens=True) for ids in outputs]
            # Perplexity of each continuation under the unsteered model: one batched request, prompt log-probs.
            scored = lab.post("/v1/completions", {"model": lab.model, "prompt": [c + ids for c, ids in zip(chat, outputs)],
                                                  "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})["choices"]
            nll = []
            for choice in sorted(scored, key=lambda c: c["index"]):
                c, ids = chat[choice["index"]], outputs[choice["index"]]
                entries = choice["prompt_logprobs"][len(c):]
                nll.append(-sum(e[str(t)]["logprob"] for e, t in zip(entries, ids)) / max(1, len(ids)))
            scores = [judge.polarity_scores(t)["compound"] for t in texts]
            return {"sentiment": statistics.fmean(scores), "per_prompt": scores,
                    "distinct": statistics.fmean(distinct_bigrams(ids) for ids in outputs),
                    "ppl": math.exp(statistics.fmean(nll)), "texts": texts}

        plain = measure(generate(None))
        print(f"plain: sentiment {plain['sentiment']:+.3f} ({sum(v >= 0.5 for v in plain['per_prompt'])} of "
              f"{len(prompts)} replies >= +0.5), distinct {plain['distinct']:.2f}, ppl {plain['ppl']:.2f}", flush=True)
        runs = []
        for concept in positive + negative:
            for s in strengths:
                m = measure(generate([f"emo/{concept}", s]))
                row = {"concept": concept, "sign": 1 if concept in positive else -1, "strength": s,
                       "shift": m["sentiment"] - plain["sentiment"], "distinct": m["distinct"],
                       "ppl_ratio": m["ppl"] / plain["ppl"], "example": m["texts"][0]}
                row["fluent"] = row["distinct"] >= MIN_DISTINCT and row["ppl_ratio"] <= MAX_PPL_RATIO
                row["passes"] = row["fluent"] and row["sign"] * row["shift"] >= TARGET_SHIFT
                runs.append(row)
                print(f"{concept:>10} x{s:<5g} shift {row['shift']:+.3f} distinct {row['distinct']:.2f} "
                      f"ppl x{row['ppl_ratio']:.2f} {'PASS' if row['passes'] else ''}", flush=True)

    write_results(args.name, args.out, {"model": args.model, "method": method, "unit": unit, "layers": layers,
                                        "steer_layer": args.layer, "prompts": args.prompts,
                                              "plain": {k: v for k, v in plain.items() if k != "texts"},
                                              "runs": runs})
    _report(args, method, unit, layers, plain, runs, strengths, positive, negative, len(prompts))


def _report(args, method, unit, layers, plain, runs, strengths, positive, negative, n_prompts) -> None:
    by = lambda c: [r for r in runs if r["concept"] == c]
    plot_lines(args.out / f"{args.name}_effect.png",
               {c: ([r["strength"] for r in by(c)], [r["shift"] for r in by(c)]) for c in positive + negative},
               "strength (natural units)", "VADER compound - plain", "Judge's sentiment shift", logx=True)
    plot_lines(args.out / f"{args.name}_fluency.png",
               {c: ([r["strength"] for r in by(c)], [r["ppl_ratio"] for r in by(c)]) for c in positive + negative},
               "strength (natural units)", "perplexity / plain", "Fluency (unsteered model's perplexity)", logx=True)
    # The documented strength: the smallest at which every concept moves the judge its way by the target
    # while fluent; else the one where most concepts pass.
    per_strength = {s: [r for r in runs if r["strength"] == s] for s in strengths}
    passing = {s: sum(r["passes"] for r in rs) for s, rs in per_strength.items()}
    best = max(strengths, key=lambda s: (passing[s], -s))
    rows = [[r["concept"], r["strength"], f"{r['shift']:+.3f}", f"{r['distinct']:.2f}", f"{r['ppl_ratio']:.2f}",
             "yes" if r["passes"] else "no"] for r in runs]
    examples = [[r["concept"], r["strength"], repr(r["example"][:140])] for r in runs if r["strength"] == best]
    body = f"""
Model: {args.model}; bank: method {method}, layers {layers}; natural unit: {unit}; steered at
{f'layer {args.layer}' if args.layer is not None else 'each of the bank layers'}; {n_prompts} neutral chat prompts
({args.prompts}), greedy, {NEW_TOKENS} new tokens. Judge: VADER compound (vaderSentiment's own lexicon), mean over
prompts. Plain: sentiment {plain['sentiment']:+.3f} ({sum(v >= 0.5 for v in plain['per_prompt'])} of {n_prompts}
replies already at +0.5 or more), distinct bigrams {plain['distinct']:.2f}, perplexity {plain['ppl']:.2f}.

A row passes when the concept moves the judge its way (positive up, negative down) by >= {TARGET_SHIFT} and the
text stays fluent (distinct bigrams >= {MIN_DISTINCT} of tokens, perplexity under the unsteered model
<= {MAX_PPL_RATIO}x plain).

{table(['concept', 'strength', 'shift', 'distinct', 'ppl / plain', 'passes'], rows)}

Passing concepts per strength: {', '.join(f'{s:g}: {passing[s]}/{len(per_strength[s])}' for s in strengths)}.
**Recommended strength: {best:g}** ({passing[best]} of {len(per_strength[best])} concepts pass).

![effect]({args.name}_effect.png) ![fluency]({args.name}_fluency.png)

First prompt at the recommended strength:

{table(['concept', 'strength', 'continuation'], examples)}
"""
    write_report(args.name, args.out, f"Steering a real model ({method} bank), judged by a sentiment lexicon", body)


if __name__ == "__main__":
    sys.exit(main())
