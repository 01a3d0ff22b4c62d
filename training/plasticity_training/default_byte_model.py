"""What every built-in byte-level model shares: one of the project's own architectures (its Hugging Face
form named by its row in contract/architectures.py), the byte tokenizer, and a model directory written the
way `plasticity import` writes one. Each architecture's spec (default_causal_bank.py, default_tkc.py,
default_synthe.py) adds its fields, its config.json fields and any initialisation of its own; the builder
is default_model.build_model.

Runs in the CLI process and in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from plasticity_training.default_model import BuiltinSpec
from vllm_plasticity.contract.architectures import architecture, load


class ByteModelSpec(BuiltinSpec):
    """A BuiltinSpec whose model reads bytes; subclasses are frozen dataclasses with a `max_seq_len` field."""

    architecture: ClassVar[str]  # its registered name (contract/architectures.py)
    name: ClassVar[str]

    def fields(self) -> dict:
        """The architecture's fields of config.json (under its config class's `field`)."""
        raise NotImplementedError

    def initialise(self, model) -> None:
        """Set what the architecture's constructor leaves to its builder (default: nothing)."""

    def make(self, text: str):
        import torch

        from plasticity_training.causal_bank_export import BYTE_VOCAB, byte_tokenizer

        model_class = self.model_class()
        config_class = model_class.config_class
        model = model_class(config_class(vocab_size=BYTE_VOCAB, **{config_class.field: self.fields()}))
        self.initialise(model)
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)  # (N,)
        return model, byte_tokenizer(self.max_seq_len), ids

    def describe(self, tokenizer) -> str:
        return "byte vocabulary"

    def save(self, model, tokenizer, out_dir: Path, extra: dict[str, str]) -> Path:
        from plasticity_training.causal_bank_export import BYTE_VOCAB, write_model_dir

        return write_model_dir(self.model_class().config_class, self.fields(), BYTE_VOCAB, model.state_dict(),
                               tokenizer, out_dir, extra=extra,
                               force=True)  # a rebuild of the cache's own entry (one from before manifests has none)

    def model_class(self) -> type:
        return load(architecture(self.architecture).hf_form)
