"""Experiment (issue #30, item 2): LoRA through `peft` on the same facts, protocol and step budget as
research/facts_real.py, in a standalone Hugging Face process on the same weights (no server): the baseline a
user of a LoRA-based online-training service would pick. Also measures the optimizer state of one step for
APOLLO (plasticity_training.apollo, the trainer's optimizer) over the parameters each facts_real setting
trains, beside AdamW's over LoRA's.

Protocol as facts_real.py: each fact taught as the chat reply to its question, one after another, one AdamW step
at a time until the reply is produced greedily (every reply token the argmax of the teacher-forced logits), at
most 10 steps; then every question, every fact and the held-out perplexity again, in-process (greedy generation,
the same matching). The untrained model is evaluated in this process too, so LoRA rows compare with their own base.

    python research/lora_baseline.py [--runs r16-lr2e-4,r16-lr1e-3] [--quick]

Results merge into research/results/facts_real.json ("lora", "memory"); facts_real.py --report writes the table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from facts_real import (DEFAULT_MODEL, HELD_OUT_TEXTS, MAX_STEPS, NAME, REPLY_TOKENS, SETTINGS, load_data, matches,
                        read_results, summarise, write_report_from)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RUNS = {  # name: (label, LoRA rank, alpha, AdamW lr). peft's usual recipe: every linear projection, alpha = 2 r.
    "lora-r16-lr2e-4": ("LoRA r16 alpha 32, all projections, AdamW lr 2e-4", 16, 32, 2e-4),
    "lora-r16-lr1e-3": ("LoRA r16 alpha 32, all projections, AdamW lr 1e-3", 16, 32, 1e-3),
}


class HFFacts:
    """The facts_real protocol on an in-process Hugging Face model."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.eval()

    def prompt(self, question: str) -> list[int]:
        return self.tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]

    def reply_ids(self, reply: str) -> list[int]:
        return self.tok(reply + self.tok.eos_token, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def replies(self, questions: list[str], batch: int = 24) -> list[str]:
        out = []
        for i in range(0, len(questions), batch):
            prompts = [self.prompt(q) for q in questions[i:i + batch]]
            width = max(map(len, prompts))
            ids = torch.tensor([[self.tok.pad_token_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=REPLY_TOKENS, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
            out += self.tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out

    def logits(self, pair: tuple[list[int], list[int]]) -> torch.Tensor:
        context, continuation = pair
        ids = torch.tensor([context + continuation])
        return self.model(input_ids=ids).logits[0, len(context) - 1:-1]  # [len(continuation), vocab]

    def loss(self, pair) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits(pair), torch.tensor(pair[1]))

    @torch.no_grad()
    def produced(self, pair) -> bool:
        return bool((self.logits(pair).argmax(-1) == torch.tensor(pair[1])).all())

    @torch.no_grad()
    def nll(self, texts: list[str]) -> float:
        """As research/lab.py's Lab.nll: mean over tokens 1..n-1 of each text's first 400 tokens."""
        total = count = 0.0
        for text in texts:
            ids = torch.tensor([self.tok(text)["input_ids"][:400]])
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1], -1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
        return total / count

    def evaluate(self, data: dict, held_out: list[str]) -> dict:
        t0 = time.monotonic()
        answers = self.replies([q for q, _ in data["questions"]])
        fact_replies = self.replies([q for q, _, _ in data["facts"]])
        out = {"questions": {q: matches(r, a) for (q, a), r in zip(data["questions"], answers)},
               "answers": {q: r for (q, _), r in zip(data["questions"], answers)},
               "facts": {q: matches(r, [key]) for (q, _, key), r in zip(data["facts"], fact_replies)},
               "fact_replies": {q: r for (q, _, _), r in zip(data["facts"], fact_replies)},
               "ppl": math.exp(self.nll(held_out))}
        print(f"[lora] evaluated in {time.monotonic() - t0:.0f} s: {sum(out['questions'].values())}/{len(answers)} "
              f"questions right, {sum(out['facts'].values())}/{len(fact_replies)} facts, ppl {out['ppl']:.4f}", flush=True)
        return out


def teach(hf: HFFacts, optimizer, facts) -> list[dict]:
    records = []
    for i, pair in enumerate(facts):
        rec = {"steps": MAX_STEPS, "learned": False, "losses": [], "step_seconds": [], "wall_seconds": [],
               "tokens": len(pair[1]), "all_tokens": 0}
        rec["tokens"] = 0
        for step in range(MAX_STEPS):
            t0 = time.monotonic()
            hf.model.train()
            loss = hf.loss(pair)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            hf.model.eval()
            seconds = time.monotonic() - t0
            rec["losses"].append(loss.item())
            rec["step_seconds"].append(seconds)
            rec["wall_seconds"].append(seconds)
            rec["tokens"] += len(pair[1])
            rec["all_tokens"] += len(pair[0]) + len(pair[1])
            if hf.produced(pair):
                rec.update(steps=step + 1, learned=True)
                break
        records.append(rec)
        print(f"[lora] fact {i}: steps {rec['steps'] if rec['learned'] else None}, "
              f"losses {[round(x, 3) for x in rec['losses']]}", flush=True)
    return records


def optimizer_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def run_lora(model_dir: str, name: str, data: dict, held_out: list[str], base: dict) -> tuple[dict, dict]:
    from peft import LoraConfig, get_peft_model

    label, rank, alpha, lr = RUNS[name]
    hf = HFFacts(model_dir)
    hf.model = get_peft_model(hf.model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LINEAR))
    trainable = [p for p in hf.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    facts = [(hf.prompt(q), hf.reply_ids(reply)) for q, reply, _ in data["facts"]]
    t0 = time.monotonic()
    records = teach(hf, optimizer, facts)
    seconds = time.monotonic() - t0
    after = hf.evaluate(data, held_out)
    run = {"label": label, "setting": {"rank": rank, "alpha": alpha, "lr": lr, "target_modules": LINEAR},
           "facts": records, "after": after, "teach_seconds": seconds}
    run["summary"] = summarise(run, base)
    memory = {"trainable": sum(p.numel() for p in trainable), "optimizer_bytes": optimizer_bytes(optimizer)}
    print(f"[lora] {name}: {run['summary']} {memory}", flush=True)
    return run, memory


def apollo_memory(model_dir: str, pair_text: tuple[str, str]) -> dict:
    """APOLLO's state after one step over the parameters each facts_real setting selects."""
    from plasticity_training.apollo import Apollo
    from vllm_plasticity.contract.settings import OptimizerSettings, select_params

    out = {}
    hf = HFFacts(model_dir)
    pair = (hf.prompt(pair_text[0]), hf.reply_ids(pair_text[1]))
    hf.model.train()
    hf.loss(pair).backward()
    named = dict(hf.model.named_parameters())
    for name in ("baseline", "mlp", "layers10-19", "rank16", "mini"):
        label, setting = SETTINGS[name]
        chosen = select_params(list(named), setting.get("params", {}))
        settings = OptimizerSettings(lr=1e-12, **setting.get("optimizer", {}))  # a step that barely moves anything
        optimizer = Apollo.from_settings([(n, named[n]) for n in chosen], settings)
        optimizer.step()
        out[f"APOLLO {name}: {label}"] = {"trainable": sum(named[n].numel() for n in chosen),
                                          "optimizer_bytes": optimizer.state_bytes()}
        print(f"[lora] APOLLO {name}: {out[f'APOLLO {name}: {label}']}", flush=True)
    return out


def main() -> None:
    from forgetting import stories
    from lab import RESULTS, write_results
    from pathlib import Path
    from plasticity_training.pretrained import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 facts, 5 questions, one run, no memory table")
    parser.add_argument("--out-dir", default=str(RESULTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    data = load_data(args.quick)
    held_out = stories(HELD_OUT_TEXTS if not args.quick else 2, seed=0)
    names = args.runs.split(",")[:1 if args.quick else None]
    base = HFFacts(model_dir).evaluate(data, held_out)
    out_dir = Path(args.out_dir)

    def save(part: str, name: str, value: dict) -> dict:  # each result as it comes (facts_real.py merges too)
        results = read_results(out_dir)
        results.setdefault(part, {})[name] = value
        results["lora_base"] = base
        write_results(NAME, out_dir, results)
        return results

    for name in names:
        run, memory = run_lora(model_dir, name, data, held_out, base)
        save("lora", name, run)
        results = save("memory", f"AdamW over {name}: {RUNS[name][0]}", memory)
    if not args.quick:
        for name, memory in apollo_memory(model_dir, data["facts"][0][:2]).items():
            results = save("memory", name, memory)
    print(write_report_from(results, out_dir).read_text())


if __name__ == "__main__":
    main()
