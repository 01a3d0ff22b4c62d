"""The built-in model builder: deterministic, the documented shape, a working tokenizer and template."""

from __future__ import annotations

import hashlib
import json

from transformers import AutoConfig, AutoTokenizer

from plasticity_training.default_model import ModelSpec, build_model


def _digest(path):
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


TEXT = "\n\n".join(f"The {w} walked to the {v} and found a {u} there." for w, v, u in
                   zip(["cat", "dog", "bird"] * 40, ["door", "river", "hill"] * 40, ["key", "stone", "book"] * 40))


def test_same_spec_same_model(tmp_path):
    spec = ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, train_steps=5, seq_len=32, batch_size=4)
    a = build_model(spec, tmp_path / "a", text=TEXT, log=lambda m: None)
    b = build_model(spec, tmp_path / "b", text=TEXT, log=lambda m: None)
    assert _digest(a) == _digest(b)
    c = build_model(ModelSpec(**{**spec.__dict__, "seed": 1}), tmp_path / "c", text=TEXT, log=lambda m: None)
    assert _digest(a) != _digest(c)


def test_qwen3_tied_variant(tmp_path):
    spec = ModelSpec(arch="qwen3", tie_word_embeddings=True, vocab_size=300, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, train_steps=0)
    path = build_model(spec, tmp_path / "q", text=TEXT, log=lambda m: None)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.architectures == ["Qwen3ForCausalLM"] and cfg.tie_word_embeddings


def test_default_model_shape_tokenizer_and_template(default_model):
    cfg = AutoConfig.from_pretrained(default_model)
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.head_dim >= 32
    record = json.loads((default_model / "plasticity_spec.json").read_text())
    # Trained, not random (ln 2048 = 7.6): 400 steps over the 600k-character corpus reach ~4.2 (3.3 when the
    # corpus was 255k characters); whether it writes words is checked through the server.
    assert record["final_loss"] is not None and record["final_loss"] < 4.6
    tok = AutoTokenizer.from_pretrained(default_model)
    ids = tok("the old house")["input_ids"]
    assert tok.decode(ids) == "the old house"
    assert len(ids) < len("the old house")  # BPE merges learned from the project's text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi\n<|assistant|>\n"
