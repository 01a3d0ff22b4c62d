"""Model directories vLLM serves, from decepticons causal-bank models: `plasticity import causal-bank`.

Runs in the CLI process. Reads what the reference package saves (a `<name>.checkpoint.pt` state dict and
its result JSON, loaded with the package's own `decepticons.loader.load_checkpoint`) or takes an in-memory
`CausalBankModel`, and writes

    config.json         architectures ["CausalBankForCausalLM"], model_type "causal_bank", vocab_size and
                        "causal_bank": {every CausalBankConfig field}; max_position_embeddings = max_seq_len
    model.safetensors   the reference's own parameter names and values, less what the server rebuilds
                        (the T x T `linear_kernel` and its index; the tied readout's alias of the embedding)
    tokenizer files     bytes (ids 0-255 are the byte values, as the package's ByteCodec) when the vocabulary
                        is 256, else the given sentencepiece model; both with a chat template
    plasticity_files.json  the files written: a later write into the same directory removes only those
                        (output_dir.py: a non-empty directory that is not a previous write is refused
                        unless `force`)

    >>> from decepticons.models.causal_bank_torch import CausalBankModel
    >>> export_causal_bank(model, "served/my-bank")                       # in memory
    >>> import_causal_bank("runs/x.checkpoint.pt", out="served/my-bank")  # the package's files

The written directory loads in vLLM (`plasticity serve DIR`) and in transformers (the project's
CausalBankForCausalLM, after `register_with_transformers()`), and refuses unsupported configurations
before anything is written (causal_bank_config.check_supported names the field).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from plasticity_training.output_dir import check_output_dir, install_output_dir
from vllm_plasticity.architectures.causal_bank_config import check_supported
from vllm_plasticity.contract.architectures import of_model_type

SKIPPED = ("linear_kernel", "_kernel_time_idx")
BYTE_VOCAB = 256
# Byte models have no spare id for special tokens: NUL (id 0) ends a sequence, and the chat template is text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def config_fields(config) -> dict:
    """Every field of a CausalBankConfig (tuples as lists, JSON-ready)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def byte_tokenizer(max_length: int):
    """A transformers fast tokenizer whose ids are the UTF-8 byte values (0-255), one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins byte-level BPE uses
    byte_to_char = {b: c for b, c in enumerate(sorted(alphabet, key=_byte_of))}
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in byte_to_char.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=byte_to_char[0], pad_token=byte_to_char[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = max_length
    return fast


def _byte_of(char: str) -> int:
    """The byte a byte-level stand-in character encodes (GPT-2's table: printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    code = ord(char)
    return code if code in printable else extra[code - 256]


def sentencepiece_tokenizer(model_file: str | os.PathLike, max_length: int):
    """A transformers fast tokenizer equal to a sentencepiece unigram model (the kind the package's
    tokenizer/build_vocab.py trains): its pieces and scores, its normalisation rules (precompiled charsmap,
    extra spaces removed) and the "▁" word-boundary convention, as the tokenizers library's own
    converter builds it. A BPE sentencepiece model is refused with what to do instead."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        raise ValueError(f"{model_file}: a sentencepiece {proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)} "
                         "model; only unigram models convert here (convert it to a transformers tokenizer.json first)")
    spec = proto.trainer_spec
    tok = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], spec.unk_id, spec.byte_fallback))
    rules = []
    if proto.normalizer_spec.precompiled_charsmap:
        rules.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    if proto.normalizer_spec.remove_extra_whitespaces:
        rules += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    tok.normalizer = normalizers.Sequence(rules)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    piece = lambda i: proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None
    eos = piece(spec.eos_id) or piece(spec.unk_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=piece(spec.pad_id) or eos,
                                   unk_token=piece(spec.unk_id))
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = max_length
    return fast


def export_causal_bank(model, out_dir: str | os.PathLike, tokenizer=None, sentencepiece: str | None = None,
                       dtype: torch.dtype = torch.float32, force: bool = False) -> Path:
    """Write `model` (a decepticons CausalBankModel) as a servable directory; returns its path.

    The tokenizer: `tokenizer` if given, else bytes for a 256-token vocabulary, else `sentencepiece`.
    Written to a temporary directory beside `out_dir` and renamed into place (never half-written); an
    existing `out_dir` follows output_dir.py's rule (`force` writes into a directory of other files).
    """
    fields = config_fields(model.config)
    check_supported(fields)
    vocab = int(model.vocab_size)
    if tokenizer is None:
        if vocab == BYTE_VOCAB:
            tokenizer = byte_tokenizer(int(fields["max_seq_len"]))
        elif sentencepiece is not None:
            tokenizer = sentencepiece_tokenizer(sentencepiece, int(fields["max_seq_len"]))
        else:
            raise ValueError(f"vocab_size {vocab} is not bytes (256): pass the sentencepiece model (--tokenizer)")
    tensors = {k: v for k, v in model.state_dict().items()
               if k not in SKIPPED and not k.endswith("._embedding_weight")}
    from vllm_plasticity.architectures.causal_bank_hf import CausalBankConfig

    return write_model_dir(CausalBankConfig, fields, vocab, tensors, tokenizer, out_dir, dtype, force=force)


def write_model_dir(config_class, fields: dict, vocab_size: int, tensors: dict[str, torch.Tensor], tokenizer,
                    out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, extra: dict | None = None,
                    force: bool = False) -> Path:
    """config.json (a project architecture's config class, its fields under `config_class.field`, the
    architecture its model type is registered as in contract/architectures.py) +
    model.safetensors + tokenizer files in `out_dir`, written beside it and renamed into place (never
    half-written). `extra` files (name -> text) are written too. An existing `out_dir` follows
    output_dir.py's rule: only a previous write is replaced, unless `force`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir).expanduser().absolute()
    check_output_dir(out_dir, force)  # before the work, and again when moving into place

    eos = tokenizer.eos_token_id
    config = config_class(vocab_size=vocab_size, **{config_class.field: fields}, eos_token_id=eos, pad_token_id=eos,
                          bos_token_id=eos)
    config.architectures = [of_model_type(config_class.model_type).name]
    config.dtype = str(dtype).removeprefix("torch.")
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".exporting-", dir=out_dir.parent))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": eos}) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        install_output_dir(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def import_causal_bank(checkpoint: str | os.PathLike, out: str | os.PathLike, result_json: str | None = None,
                       tokenizer: str | None = None, force: bool = False) -> Path:
    """The package's own checkpoint (state dict + result JSON) -> a servable directory at `out` (refused
    before loading anything when `out` may not be written: output_dir.py)."""
    check_output_dir(out, force)
    try:
        from decepticons.loader import load_checkpoint
    except ImportError as exc:
        raise RuntimeError("importing a causal-bank checkpoint needs the reference package: "
                           "pip install 'decepticons[torch]==0.1.3'") from exc
    loaded = load_checkpoint(str(checkpoint), result_json=result_json, tokenizer_path=tokenizer, device="cpu")
    return export_causal_bank(loaded._model, out, sentencepiece=tokenizer, force=force)  # the package keeps its model there
