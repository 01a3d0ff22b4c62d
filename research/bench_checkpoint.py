"""Benchmark: block-diff checkpoint sync vs a full rewrite, bytes and seconds per checkpoint, side by side.

Runs in one process, no server. A random-init Llama of configurable size (HF model, HF names: what
`hf_tensors` gives the trainer) is checkpointed after each simulated training step two ways, one right
after the other, on the same disk, both crash-safe and fsynced:

  * block diff: `sync_checkpoint` (A/B generations, 4 KiB block compare, changed blocks pwritten, flip);
  * full rewrite: `safetensors.torch.save_file` of every tensor to a temporary file, fsync, rename
    (the cheapest crash-safe way to write the whole model each time).

Scenarios (each a few steps; the first step of a scenario is reported apart because the A/B standby is
two syncs behind and still carries the previous scenario's changes):
  * full-model step: every parameter scaled by (1 + 1e-3): every block changes;
  * one-layer step: the parameters of one decoder layer (the same layer each step) change;
  * no change: a sync right after a sync (the compare alone).

    python research/bench_checkpoint.py [--hidden 1024 --layers 6 --intermediate 2816 --vocab 16000]
        [--dtype float32] [--steps 5] [--dir /tmp/...] [--out research/checkpoint_results.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from plasticity_training.checkpoint import ChangeTracker, hf_tensors, sync_checkpoint


def build_model(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    return model.eval()


def full_rewrite(tensors: dict[str, torch.Tensor], out_dir: Path) -> tuple[int, float]:
    """The baseline: the whole model to a temporary file, fsync, rename; returns (bytes, seconds)."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    tmp, final = out_dir / "model.safetensors.tmp", out_dir / "model.safetensors"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    return final.stat().st_size, time.perf_counter() - t0


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def command() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", str(script), *sys.argv[1:]])


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10).stdout.splitlines()
        dev, fstype = out[1].split()[:2]
        return f"{fstype} on {dev}"
    except Exception:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per scenario (after one transition step)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("checkpoint_results.md"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    load_before = os.getloadavg()
    try:
        model = build_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        src = work / "source"
        model.config.save_pretrained(src)
        model.generation_config.save_pretrained(src)
        ckpt, full_dir = work / "ckpt", work / "full"
        full_dir.mkdir()
        layer = args.layers // 2
        tensors = hf_tensors(model)
        model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[layer].parameters())
        print(f"[bench] {n_params / 1e6:.1f}M parameters, {model_bytes / 1e6:.1f} MB ({args.dtype}), "
              f"layer {layer}: {layer_bytes / 1e6:.2f} MB; writing under {work}", flush=True)

        changes = ChangeTracker()  # what the trainer does: it reports the tensors each step changed
        first = sync_checkpoint(tensors, ckpt, src, changes=changes)
        first_full = full_rewrite(tensors, full_dir)
        print(f"[bench] first sync: {first.bytes_written / 1e6:.1f} MB in {first.seconds:.2f}s "
              f"(generation + seeded standby); full rewrite {first_full[0] / 1e6:.1f} MB in {first_full[1]:.2f}s", flush=True)

        @torch.no_grad()
        def step(kind: str) -> None:
            prefix = "" if kind == "full-model step" else f"model.layers.{layer}."
            stepped = [(name, p) for name, p in model.named_parameters() if name.startswith(prefix)]
            for _, p in stepped:
                p.mul_(1 + 1e-3)
            changes.stepped(name for name, _ in stepped)

        rows = []
        n = 0
        for kind in ("full-model step", "one-layer step", "no change"):
            for i in range(args.steps + 1):
                if kind != "no change":
                    step(kind)
                order = ("diff", "full") if n % 2 == 0 else ("full", "diff")
                n += 1
                res = {}
                for method in order:
                    if method == "diff":
                        r = sync_checkpoint(hf_tensors(model), ckpt, src, changes=changes)
                        res["diff"] = (r.bytes_written, r.seconds, r.bytes_read, r.blocks_changed, r.blocks_total)
                    else:
                        res["full"] = full_rewrite(hf_tensors(model), full_dir)
                rows.append((kind, i == 0, res))
                d, f = res["diff"], res["full"]
                print(f"[bench] {kind}{' (transition)' if i == 0 else ''}: diff {d[0] / 1e6:.2f} MB {d[1]:.3f}s "
                      f"({d[3]}/{d[4]} blocks), full {f[0] / 1e6:.2f} MB {f[1]:.3f}s", flush=True)

        # The checkpoint is what the model holds now, bit for bit.
        from safetensors.torch import load_file

        back = load_file(str(ckpt / "current" / "model.safetensors"))
        now = hf_tensors(model)
        assert set(back) == set(now) and all(torch.equal(back[k], now[k]) for k in now), "checkpoint != model"
    finally:
        fs = filesystem(work)
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    def med(xs):
        return statistics.median(xs)

    lines = [
        "# Checkpoint benchmark: block-diff sync vs full rewrite",
        "",
        f"Command: `{command()}`",
        "",
        f"Machine: {machine()}; files on {fs}; torch {torch.__version__}, {torch.get_num_threads()} threads. "
        f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared).",
        "",
        f"Model: random-init Llama, {n_params / 1e6:.1f}M parameters, {args.dtype}, {args.layers} layers, hidden "
        f"{args.hidden}, MLP {args.intermediate}, vocab {args.vocab} (untied): {model_bytes / 1e6:.1f} MB of tensors; "
        f"one layer (layer {layer}) = {layer_bytes / 1e6:.2f} MB. Block size 4096. Both methods fsync; the "
        "model files fit in the page cache, so the diff's reads come from memory.",
        "",
        f"First checkpoint: block-diff {first.bytes_written / 1e6:.1f} MB (the generation plus the seeded standby copy) "
        f"in {first.seconds:.2f} s; full rewrite {first_full[0] / 1e6:.1f} MB in {first_full[1]:.2f} s.",
        "",
        f"Median of {args.steps} checkpoints per scenario (after one transition checkpoint, shown separately):",
        "",
        "| scenario | block diff: MB written | block diff: s | full rewrite: MB written | full rewrite: s | bytes ratio (diff/full) | time ratio (diff/full) | diff: MB read |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("full-model step", "one-layer step", "no change"):
        for transition in (True, False):
            sel = [res for k, t, res in rows if k == kind and t == transition]
            db, ds = med([r["diff"][0] for r in sel]), med([r["diff"][1] for r in sel])
            fb, fs_ = med([r["full"][0] for r in sel]), med([r["full"][1] for r in sel])
            dr = med([r["diff"][2] for r in sel])
            label = f"{kind} (first after the previous scenario)" if transition else kind
            lines.append(f"| {label} | {db / 1e6:.2f} | {ds:.3f} | {fb / 1e6:.1f} | {fs_:.3f} | {db / fb:.4f} | "
                         f"{ds / fs_:.3f} | {dr / 1e6:.1f} |")
    lines += [
        "",
        "Reading the table: a sync writes the blocks changed in the last two syncs (the standby generation is two",
        "syncs behind), so the first one-layer checkpoint after a full-model step still rewrites the whole model,",
        "and the first no-change checkpoint after a one-layer step writes that layer once more. The block diff reads",
        "and compares only the tensors the steps changed since the standby generation was written (ChangeTracker,",
        "which the trainer feeds after every step; the last column), so a one-layer sync reads about that layer and",
        "its time follows its bytes. The second sync of a run compares in full (its standby was seeded by copy,",
        "not written by a sync). Before writing, a sync checks that every tensor it may write is finite (a",
        "non-finite model is refused, never checkpointed): a full pass over the model when everything changed,",
        "which is most of why a full-model block diff is slower here than a plain rewrite (both in the page cache).",
        "The full rewrite pays safetensors' serialization plus writing new file blocks.",
        "Bytes written include the index, manifest and any changed small files (a few KB).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
