"""The causal bank's forms without a server: the project's Hugging Face form equals the reference package's
forward for every supported variant, continues from saved state exactly, and the supported-field table,
the exporter, the importer (the package's own checkpoint files) and the built-in builder do what they say."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.causal_bank_models import SERVED_SWEEP, VARIANTS, reference_model
from vllm_plasticity.architectures.causal_bank_config import REFUSED, UnsupportedConfig, check_supported

pytest.importorskip("decepticons")


def hf_form(model_dir):
    from transformers import AutoModelForCausalLM

    from vllm_plasticity.architectures import register_with_transformers

    register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("variant", [*VARIANTS, *SERVED_SWEEP])
def test_hf_form_equals_the_reference_and_continues_from_its_state(variant, tmp_path):
    from plasticity_training.causal_bank_export import export_causal_bank

    ref = reference_model({**VARIANTS, **SERVED_SWEEP}[variant], seed=3)
    model = hf_form(export_causal_bank(ref, tmp_path / "m"))
    ids = torch.randint(0, 256, (3, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids)
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :100], use_cache=True)
        rest = model(input_ids=ids[:, 100:101], past_key_values=first.past_key_values, use_cache=True)
        tail = model(input_ids=ids[:, 101:], past_key_values=rest.past_key_values)
    assert (full - want).abs().max().item() <= 1e-4
    stepped = torch.cat([first.logits, rest.logits, tail.logits], dim=1)
    assert (stepped - full).abs().max().item() <= 1e-4


def test_the_exported_weights_load_into_the_reference_by_its_own_names(tmp_path):
    from safetensors.torch import load_file

    from plasticity_training.causal_bank_export import export_causal_bank

    ref = reference_model({}, seed=1)
    out = export_causal_bank(ref, tmp_path / "m")
    tensors = load_file(str(out / "model.safetensors"))
    assert "linear_kernel" not in tensors  # rebuilt by the recurrence, never stored
    fresh = reference_model({}, seed=2)
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert unexpected == [] and missing == ["linear_kernel"]
    ids = torch.randint(0, 256, (1, 50))
    assert torch.equal(fresh(ids), ref(ids))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["CausalBankForCausalLM"] and config["model_type"] == "causal_bank"
    assert set(config["causal_bank"]) == {f.name for f in dataclasses.fields(ref.config)}
    assert config["max_position_embeddings"] == ref.config.max_seq_len


def test_import_reads_the_packages_own_checkpoint_files(tmp_path):
    from plasticity_training.cli import main

    ref = reference_model({"readout_bands": 2, "mix_mode": "gated"}, seed=4, max_seq_len=128)
    torch.save(ref.state_dict(), tmp_path / "run.checkpoint.pt")
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ref.config).items()}
    (tmp_path / "run.json").write_text(json.dumps({"model": fields, "config": {"train": {"seq_len": 128}},
                                                   "dataset": {"vocab_size": 256}}))
    with _no_exit():
        main(["import", "causal-bank", str(tmp_path / "run.checkpoint.pt"), "--out", str(tmp_path / "served")])
    model = hf_form(tmp_path / "served")
    ids = torch.randint(0, 256, (2, 128))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref(ids)).abs().max().item() <= 1e-4


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is SystemExit:
            raise AssertionError(f"plasticity import exited with {exc.code}")
        return False


def test_import_refuses_an_unsupported_configuration_naming_the_field(tmp_path, capsys):
    from plasticity_training.cli import main

    ref = reference_model({"num_blocks": 2}, seed=4, max_seq_len=64)
    torch.save(ref.state_dict(), tmp_path / "run.checkpoint.pt")
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ref.config).items()}
    (tmp_path / "run.json").write_text(json.dumps({"model": fields, "config": {"train": {"seq_len": 64}},
                                                   "dataset": {"vocab_size": 256}}))
    with pytest.raises(SystemExit) as exit_:
        main(["import", "causal-bank", str(tmp_path / "run.checkpoint.pt"), "--out", str(tmp_path / "served")])
    assert exit_.value.code == 2
    assert "causal_bank.num_blocks=2 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "served").exists()


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_every_refused_field_is_named_with_its_reason(field):
    accepts, required, why = REFUSED[field]
    bad = {"substrate_mode": "gated_delta", "linear_readout_kind": "recurrent", "state_impl": "retention",
           "patch_causal_decoder": "autoregressive", "memory_kind": "ngram", "table_path": "x.bin"}.get(field, 2)
    assert not accepts(bad)
    with pytest.raises(UnsupportedConfig) as err:
        check_supported({field: bad})
    assert str(err.value) == f"causal_bank.{field}={bad!r} is not supported (needs {required}): {why}"


def test_the_byte_tokenizer_maps_text_to_its_utf8_bytes():
    from plasticity_training.causal_bank_export import byte_tokenizer

    tok = byte_tokenizer(64)
    text = "naïve café — ok\n"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 0 and len(tok) == 256


def test_the_built_in_causal_bank_builds_deterministically(tmp_path):
    from safetensors.torch import load_file

    from plasticity_training.default_causal_bank import CausalBankSpec
    from plasticity_training.default_model import build_model

    spec = CausalBankSpec(train_steps=3, seq_len=32, batch_size=2)
    a = load_file(str(build_model(spec, tmp_path / "a", text="abc " * 200, log=lambda m: None) / "model.safetensors"))
    b = load_file(str(build_model(spec, tmp_path / "b", text="abc " * 200, log=lambda m: None) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    decays = a["linear_decays"]
    assert 0 < decays.min() and decays.max() < 1 and torch.all(decays[1:] > decays[:-1])  # half-lives grow


def test_a_sentencepiece_vocabulary_gets_a_tokenizer_equal_to_sentencepiece(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from plasticity_training.causal_bank_export import export_causal_bank
    from tests.conftest import REPO

    text = "\n".join(p.read_text() for p in sorted((REPO / "amygdala_stories" / "stories").glob("*.txt"))[:40])
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    out = export_causal_bank(reference_model({}, vocab=300, seed=1, max_seq_len=64), tmp_path / "served",
                             sentencepiece=str(tmp_path / "sp.model"))
    tok = AutoTokenizer.from_pretrained(out)
    for s in ["The lanterns swung in the lemon trees.", "Rosa's  grandmother,\tlaughing: 'Okay, sweetheart!'"]:
        assert tok(s)["input_ids"] == sp.encode(s)  # extra spaces, a tab, a character it has no piece for
    text = "The lanterns swung in the lemon trees."
    assert tok.decode(tok(text)["input_ids"]) == sp.decode(sp.encode(text)) == text
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "bpe"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    with pytest.raises(ValueError, match="only unigram models convert here"):
        export_causal_bank(reference_model({}, vocab=300, seed=1, max_seq_len=64), tmp_path / "bpe-served",
                           sentencepiece=str(tmp_path / "bpe.model"))
