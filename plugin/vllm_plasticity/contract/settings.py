"""What a /train job may set: samples, optimizer settings and the parameter filter, with their one set of
defaults and bounds.

Any process. The API server validates request bodies with these models (a bad value is a 4xx with the
reason, nothing queued); the trainer receives them validated and builds its optimizer from them, so a
default or a bound lives here and nowhere else. Numbers are JSON numbers (an integer is fine where a float
is asked), never strings or booleans (pydantic's lax mode would read "1e-3" as 0.001 and `true` as 1.0),
and never NaN/Inf.

    >>> OptimizerSettings(lr=1e-4).model_dump()["grad_clip"]
    1.0
    >>> select_params(names, ParamsFilter(layers=(20, 27), embeddings=False))
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, model_validator

from vllm_plasticity.contract.architectures import is_embedding

# Settings that fix the optimizer state's shapes: a job may not change them once state exists.
SHAPE_SETTINGS = ("rank", "mini")
# Gated DeltaNet (Qwen3-Next) decay parameters: g = -exp(A_log) * softplus(a + dt_bias); kind "decay".
DECAY_PARAMS = ("A_log", "dt_bias")
ContextMode = Literal["masked", "no_grad"]


# The largest finite float32: a value the trainer puts in a float32 tensor must not be beyond it.
FLOAT32_MAX = 3.4028234663852886e38
# A sample's weight is 0 (skipped) or in [MIN_WEIGHT, MAX_WEIGHT]. The losses divide by sums of weights in
# float32, where a weight like 1e-50 is 0: the job would end 422 "non-finite loss" instead of a 400 here.
MIN_WEIGHT = 1e-6
MAX_WEIGHT = 1e6


_JSON_KINDS = {str: "a string", type(None): "null", list: "an array", dict: "an object"}


def _json_number(value):
    """Only what JSON calls a number reaches float(): ints and floats, not booleans, not strings."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if not isinstance(value, (int, float)):
        raise ValueError(f"must be a JSON number, not {_JSON_KINDS.get(type(value), type(value).__name__)}")
    return value


def _zero_or_at_least_min(weight: float) -> float:
    if 0 < weight < MIN_WEIGHT:
        raise ValueError(f"weight {weight!r} is too small: 0 (skip the sample) or in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]")
    return weight


def _in_float32(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value!r} is beyond float32's range [{-FLOAT32_MAX:.7g}, {FLOAT32_MAX:.7g}]")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]


class Strict(BaseModel):
    """Unknown keys rejected, no NaN/Inf: the base of every model that crosses the process line."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Objective = Literal["sft", "orpo", "dpo"]
Weight = Annotated[Number, Field(ge=0, le=MAX_WEIGHT, description=f"the sample's weight in the loss: 0 (skipped) or "
                                 f"in [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]"), AfterValidator(_zero_or_at_least_min)]
# A summed log-prob: <= 0, and no further below than float32 reaches (the trainer holds it in float32).
LogProb = Annotated[Number, Field(le=0), AfterValidator(_in_float32)]


class Sample(Strict):
    """An `sft` sample: the loss is the continuation's cross-entropy given the context."""

    context_ids: list[StrictInt] = Field(min_length=1, description="conditioning tokens (no loss)")
    continuation_ids: list[StrictInt] = Field(min_length=1, description="tokens the loss is on")
    weight: Weight = 1.0

    def sequences(self) -> list[list[int]]:
        return [self.continuation_ids]


class PreferenceSample(Strict):
    """An `orpo` or `dpo` sample: a context, a preferred and a rejected continuation. For DPO the client may
    give the reference log-probs (sums over each continuation's tokens); otherwise the served weights at the
    start of the job are the reference."""

    context_ids: list[StrictInt] = Field(min_length=1)
    chosen_ids: list[StrictInt] = Field(min_length=1, description="the preferred continuation")
    rejected_ids: list[StrictInt] = Field(min_length=1, description="the rejected continuation")
    weight: Weight = 1.0
    ref_chosen_logp: LogProb | None = Field(None, description="dpo: reference log p(chosen | context)")
    ref_rejected_logp: LogProb | None = Field(None, description="dpo: reference log p(rejected | context)")

    @model_validator(mode="after")
    def _both_references_or_neither(self):
        if (self.ref_chosen_logp is None) != (self.ref_rejected_logp is None):
            raise ValueError("give both ref_chosen_logp and ref_rejected_logp, or neither")
        return self

    def sequences(self) -> list[list[int]]:
        return [self.chosen_ids, self.rejected_ids]


def sample_tokens(sample: Sample | PreferenceSample) -> int:
    """What a sample costs against a request's token limit (PLASTICITY_TRAIN_MAX_TOKENS): its context once per
    continuation (each continuation is a forward of its own), plus the continuations."""
    sequences = sample.sequences()
    return len(sample.context_ids) * len(sequences) + sum(map(len, sequences))


def sample_length(sample: Sample | PreferenceSample) -> int:
    """The longest sequence a sample feeds the model (context + its longest continuation): at most the
    model's maximum length."""
    return len(sample.context_ids) + max(map(len, sample.sequences()))


class PreferenceSettings(Strict):
    """The preference objectives' strengths: DPO's beta (Rafailov et al. 2023) and ORPO's lambda (Hong et
    al. 2024), with their papers' usual defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    beta: Number = Field(0.1, gt=0, le=100.0, description="dpo: strength of the implicit KL constraint")
    lambda_: Number = Field(0.1, ge=0, le=100.0, alias="lambda", description="orpo: weight of the odds-ratio term")


class OptimizerSettings(Strict):
    """APOLLO settings (training/plasticity_training/apollo.py), defaults and the bounds a job may ask."""

    lr: Number = Field(1e-5, gt=0, le=1.0)
    betas: tuple[Number, Number] = (0.9, 0.999)
    eps: Number = Field(1e-6, gt=0, le=1.0)
    weight_decay: Number = Field(0.0, ge=0, le=1.0)
    warmup_steps: StrictInt = Field(0, ge=0, le=100_000)
    rank: StrictInt = Field(64, ge=1, le=4096)  # fixed once optimizer state exists (SHAPE_SETTINGS)
    scale: Number = Field(1.0, gt=0, le=1000.0)
    proj_refresh: StrictInt = Field(200, ge=1, le=1_000_000)
    norm_growth_limit: Number = Field(1.01, ge=1, le=1000.0)
    mini: StrictBool = False  # APOLLO-Mini: rank 1, tensor-wise scaling; fixed once state exists
    grad_clip: Number = Field(1.0, gt=0, le=1e6)

    @model_validator(mode="after")
    def _betas_in_range(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        return self

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in SHAPE_SETTINGS}


class ParamsFilter(Strict):
    """Which weights train: all by default; `layers` [first, last] limits to those decoder layers."""

    layers: tuple[StrictInt, StrictInt] | None = None
    attention: StrictBool = True
    mlp: StrictBool = True
    embeddings: StrictBool = True
    norms: StrictBool = True
    linear_attention: StrictBool = True  # Gated DeltaNet projections and conv1d (in_proj_qkvz/_ba, conv1d, out_proj)
    decay: StrictBool = True  # Gated DeltaNet A_log and dt_bias

    @model_validator(mode="after")
    def _layer_range(self):
        if self.layers is not None and not 0 <= self.layers[0] <= self.layers[1]:
            raise ValueError(f"layers must be [first, last] with 0 <= first <= last, got {list(self.layers)}")
        return self


def param_kind(name: str) -> str:
    """attention, mlp, embeddings, norms, linear_attention or decay, for a Llama/Qwen/Qwen3-Next parameter
    name (HF's or vLLM's: the fused qkv_proj/gate_up_proj sit under the same `self_attn`/`mlp` modules; MoE
    routers and experts are mlp). Embedding tables are the ones each architecture registers
    (contract/architectures.py). In the project's attention-free architectures (names outside `model.`),
    every other weight (substrate, state projections, readouts) counts as mlp."""
    if is_embedding(name):
        return "embeddings"
    if not name.startswith("model."):
        return "mlp"
    if name.rpartition(".")[2] in DECAY_PARAMS:
        return "decay"
    if "norm" in name:  # input/post-attention norms, q_norm/k_norm, the final norm, GDN's gated norm
        return "norms"
    if ".linear_attn." in name:
        return "linear_attention"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    raise ValueError(f"unclassified parameter {name!r}")


def layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] else None


def select_params(names: list[str], spec: ParamsFilter | dict) -> list[str]:
    """The parameter names a filter selects. With a layer range only parameters inside those decoder
    layers are candidates (embeddings and the final norm are outside any layer)."""
    spec = spec if isinstance(spec, ParamsFilter) else ParamsFilter(**spec)
    chosen = []
    for name in names:
        if not getattr(spec, param_kind(name)):
            continue
        if spec.layers is not None:
            idx = layer_index(name)
            if idx is None or not spec.layers[0] <= idx <= spec.layers[1]:
                continue
        chosen.append(name)
    return chosen
