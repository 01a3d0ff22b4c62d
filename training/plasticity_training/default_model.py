"""The built-in models: one builder for every architecture's built-in model, and the default one, a tiny
Llama trained here on this project's own text.

Runs in the CLI process (`plasticity default-model [--arch A]`, `make demo`) and in tests. Nothing is
downloaded: the tokenizer is trained on the project's text (byte-level BPE; the project's own architectures
read bytes), the model is initialised from a seed and trained briefly on the same text so that its samples
are word-like rather than random.

    >>> from plasticity_training.default_model import ModelSpec, build_model
    >>> path = build_model(ModelSpec(), "/tmp/plasticity-default")      # ~1-2 min on 2 cores
    >>> tiny = build_model(ModelSpec(arch="qwen3", tie_word_embeddings=True, train_steps=0), "/tmp/q3")
    >>> bank = default_model_path(CausalBankSpec())                     # default_causal_bank.py

A spec says everything that determines the built model (`BuiltinSpec`); each architecture's built-in spec
is named by its row in contract/architectures.py (`builtin_specs()`). Same spec, same text, same machine:
same bytes (fixed seeds, fixed thread count, deterministic algorithms). `default_model_path()` caches a
build under the user's cache directory, keyed by a hash of the spec and the text, so a changed corpus
gives a new model rather than a stale one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar, Literal

from vllm_plasticity.contract.architectures import REGISTRY, load

REPO_ROOT = Path(__file__).resolve().parents[2]  # training/plasticity_training/<file>
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
# A minimal chat template in the Jinja dialect that transformers and vLLM both render.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


class BuiltinSpec:
    """What the builder asks of a built-in model's spec (a frozen dataclass: its fields are everything that
    determines the built model, saved beside it as `plasticity_spec.json` and hashed into its cache path).

    Fields every spec has: train_steps (0 = random init), seq_len, batch_size, lr, seed (train_next_token).
    `name` is its `--arch` name and cache-directory prefix; `summary` and `CLI_OPTIONS` (spec field ->
    (choices, help)) describe it in `plasticity default-model --help`."""

    summary: ClassVar[str] = ""
    CLI_OPTIONS: ClassVar[dict[str, tuple[tuple[str, ...], str]]] = {}

    def key(self, text_digest: str) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True) + text_digest
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def make(self, text: str):
        """(model, tokenizer, token ids of `text` as a 1-D LongTensor), the model freshly initialised."""
        raise NotImplementedError

    def describe(self, tokenizer) -> str:
        """What the build log says of the model after its parameter count."""
        raise NotImplementedError

    def save(self, model, tokenizer, out_dir: Path, extra: dict[str, str]) -> Path:
        """Write the model directory (never half-written) with the `extra` files (name -> text)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ModelSpec(BuiltinSpec):
    """The default built-in model: a Llama (or a Qwen2/Qwen3 of the same shape) with its own BPE tokenizer."""

    summary: ClassVar[str] = "a 4-layer Llama"

    arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    vocab_size: int = 2048  # BPE merges learned until this size (specials included)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA, so the fused qkv split is exercised
    head_dim: int = 32  # vLLM's CPU attention rejects 16; 32 and 64 work
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    train_steps: int = 400  # 0 = random init (fast, for parity tests)
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0

    @property
    def name(self) -> str:
        return self.arch

    def make(self, text: str):
        import torch
        import transformers

        tokenizer = train_tokenizer(text, self.vocab_size)
        config = hf_config(self, len(tokenizer), tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        ids = torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)  # (N,)
        return model, tokenizer, ids

    def describe(self, tokenizer) -> str:
        return f"vocab {len(tokenizer)}"

    def save(self, model, tokenizer, out_dir: Path, extra: dict[str, str]) -> Path:
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=_ensure_dir(out_dir.parent)))
        model.generation_config.do_sample = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # a half-built model is never visible under out_dir
        return out_dir


def builtin_specs() -> dict[str, type[BuiltinSpec]]:
    """`--arch` name -> spec class of every registered architecture's built-in model, in the table's order
    (contract/architectures.py; the first is the default)."""
    specs = [load(arch.builtin) for arch in REGISTRY if arch.builtin]
    return {spec().name: spec for spec in specs}


def project_text_files(root: Path = REPO_ROOT) -> list[Path]:
    """The project's own prose, in a fixed order: the story corpus and its README.

    Only the corpus, not the code docs, so that editing README.md or DESIGN.md does not change the model; not
    its held-out stories (heldout/), which no model or bank of the project may have seen.
    """
    corpus = root / "amygdala_stories"
    files = sorted(p for p in corpus.rglob("*.txt") if p.relative_to(corpus).parts[0] != "heldout")
    readme = root / "amygdala_stories" / "README.md"
    return files + ([readme] if readme.exists() else [])


def read_project_text(root: Path = REPO_ROOT) -> str:
    files = project_text_files(root)
    if not files:
        raise RuntimeError(f"no training text found under {root} (expected amygdala_stories/)")
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in files)


def default_cache_dir() -> Path:
    base = os.environ.get("PLASTICITY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "plasticity"
    )
    return Path(base)


def default_model_path(spec: BuiltinSpec = ModelSpec(), build: bool = True, log=print) -> Path:
    """Path of the cached build of `spec` on the project's text; builds it first if absent."""
    text = read_project_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = default_cache_dir() / "models" / f"default-{spec.name}-{spec.key(digest)}"
    if build and not (path / "config.json").exists():
        build_model(spec, path, text=text, log=log)
    return path


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on `text`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    return fast


def hf_config(spec: ModelSpec, vocab_size: int, eos_id: int):
    """The transformers config for `spec` (Llama, Qwen2 or Qwen3 layout)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    if spec.arch == "llama":
        cfg = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    elif spec.arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif spec.arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, attention_bias=False)
    else:
        raise ValueError(f"Invalid arch: {spec.arch!r} (expected llama, qwen2 or qwen3)")
    cfg.dtype = "float32"
    return cfg


@contextlib.contextmanager
def deterministic_build(threads: int = 2):
    """Fixed thread count and deterministic kernels while a built-in model is built (same spec, same text,
    same machine: same bytes); the caller's settings come back afterwards."""
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads_before)


def build_model(spec: BuiltinSpec, out_dir: str | os.PathLike, text: str | None = None, log=print) -> Path:
    """Build `spec`'s tokenizer + model, trained on `text` (default: the project's), into `out_dir` and
    return the path. Every built-in model is built here, whatever its architecture."""
    import torch

    out_dir = Path(out_dir)
    text = read_project_text() if text is None else text
    t0 = time.monotonic()
    with deterministic_build():
        torch.manual_seed(spec.seed)
        model, tokenizer, ids = spec.make(text)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"[default-model] {spec.name}: {n_params / 1e6:.2f}M parameters, {spec.describe(tokenizer)}, "
            f"{len(text) / 1e3:.0f}k characters of project text")
        final_loss = train_next_token(model, ids, spec, log) if spec.train_steps else None
        record = dict(dataclasses.asdict(spec), arch=spec.name, parameters=n_params, final_loss=final_loss,
                      text_characters=len(text), build_seconds=round(time.monotonic() - t0, 1))
        out = spec.save(model, tokenizer, out_dir, {"plasticity_spec.json": json.dumps(record, indent=1) + "\n"})
    log(f"[default-model] built {out} in {time.monotonic() - t0:.0f}s"
        + (f", final loss {final_loss:.3f}" if final_loss is not None else ""))
    return out


def train_next_token(model, ids, spec, log) -> float:
    """Next-token training on random windows of `ids` (a 1-D LongTensor): AdamW, linear warmup then cosine
    decay to 10%; a model's `frozen_parameters` (if it has any) are left alone. Returns the last smoothed
    loss. `spec` gives train_steps, seq_len, batch_size, lr and seed. Every built-in model trains with it."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    frozen = set(getattr(model, "frozen_parameters", ()))
    trainable = [p for n, p in model.named_parameters() if n not in frozen]
    opt = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, spec.train_steps // 20)
    model.train()
    smoothed = None
    for step in range(spec.train_steps):
        # Linear warmup then cosine decay to 10%.
        frac = step / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (spec.train_steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = spec.lr * frac
        starts = torch.randint(0, len(ids) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
        batch = torch.stack([ids[s : s + spec.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 100 == 0 or step == spec.train_steps - 1:
            log(f"[default-model] step {step + 1}/{spec.train_steps} loss {smoothed:.3f}")
    model.eval()
    return round(smoothed, 4)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
