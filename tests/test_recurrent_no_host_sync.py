"""The shared recurrent layer (RecurrentStateLayer) never reads a device tensor on the host during a step.

On a GPU such a read (`.tolist()`, `.item()`, `bool(t)`, a boolean-mask index) waits for the device and
cannot run inside CUDA-graph capture. On CPU nothing waits, so these tests stand in for the device: every
tensor vLLM keeps on the device (query_start_loc, seq_lens, the block table, the state slots, the layer's
inputs) is a `DeviceOnly` tensor, whose values cannot be read on the host (nor those of anything computed
from it), and the step runs under `NoHostReads`, which fails on the aten ops that read device values on the
host. The metadata comes from the layer's own builder (`get_attn_backend()`), as vLLM makes it, from host
copies (query_start_loc_cpu, seq_lens_cpu_upper_bound) that are plain tensors. The outputs and states must
equal each architecture's own forward over whole sequences: decodes batched, prefills fresh and continued.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vllm.config import CUDAGraphMode, VllmConfig
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_plasticity.architectures.recurrent_layer import RecurrentStateLayer

SLOTS = 8  # state slots; slot 0 is vLLM's null block (padding rows of a CUDA graph write there)


class HostRead(AssertionError):
    pass


class DeviceOnly(torch.Tensor):
    """A tensor standing for one on an accelerator: reading its values on the host raises. Ops on it return
    DeviceOnly tensors (torch's default __torch_function__), so what is computed from it is guarded too."""

    def _refuse(self, *_, **__):
        raise HostRead("a device tensor was read on the host")

    tolist = item = numpy = cpu = __bool__ = __int__ = __float__ = __index__ = __array__ = _refuse

    def to(self, *args, **kwargs):
        if any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
               for a in (*args, kwargs.get("device"))):
            self._refuse()
        return torch.Tensor.to(self, *args, **kwargs)


def on_device(t: torch.Tensor) -> DeviceOnly:
    return t.as_subclass(DeviceOnly)


class NoHostReads(TorchDispatchMode):
    """Fails on the aten ops that copy device values to the host (or wait for them) on a GPU."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2",
               "unique_dim", "unique_consecutive", "repeat_interleave"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            raise HostRead(f"aten.{name} reads device values on the host")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            raise HostRead("indexing by a boolean mask reads device values on the host")
        return func(*args, **(kwargs or {}))


# ---- the architectures, as their served forms present them to the layer -------------------------------------
class WholeModel:
    """A one-layer architecture (causal bank, TKC with the GRU backbone), as recurrent_vllm presents it."""

    def __init__(self, model) -> None:
        self.model = model

    def recurrent_state_shapes(self):
        return [tuple(z.shape[1:]) for z in self.model.zero_states(1, torch.device("cpu"))]

    def zero_states(self, rows, device):
        return self.model.zero_states(rows, device)

    def stream(self, ids, states):
        return self.model.stream(ids, states)


def seeded(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def causal_bank():
    from vllm_plasticity.architectures.causal_bank_hf import CausalBankConfig, CausalBankForCausalLM

    fields = {"embedding_dim": 8, "linear_modes": 16, "local_window": 3, "linear_hidden": [16],
              "local_hidden": [16], "state_dim": 4, "num_heads": 2}
    model = seeded(CausalBankForCausalLM(CausalBankConfig(vocab_size=32, causal_bank=fields)))
    with torch.no_grad():
        model.linear_decays.copy_(torch.linspace(0.5, 0.99, 16))
        model._ssm_A.copy_(-torch.rand(model._ssm_A.shape))
    return WholeModel(model), lambda n: torch.randint(0, 32, (n,))


def tkc():
    from vllm_plasticity.architectures.tkc_hf import TKCConfig, TKCForCausalLM

    model = seeded(TKCForCausalLM(TKCConfig(vocab_size=32, tkc={"d_model": 16, "n_layers": 2, "mem_slots": 4})))
    return WholeModel(model), lambda n: torch.randint(0, 32, (n,))


def synthe_block():
    """SYNTHE's block 1 and its hub, each a state layer of the served model: hidden states in."""
    from tests.synthe_reference import FIELDS
    from vllm_plasticity.architectures.synthe_hf import SyntheConfig, SyntheForCausalLM
    from vllm_plasticity.architectures.synthe_vllm import BlockStream

    model = seeded(SyntheForCausalLM(SyntheConfig(vocab_size=32, synthe=FIELDS)))
    return BlockStream(model, 1), lambda n: torch.randn(n, FIELDS["d_model"])


def synthe_hub():
    from tests.synthe_reference import FIELDS
    from vllm_plasticity.architectures.synthe_hf import SyntheConfig, SyntheForCausalLM
    from vllm_plasticity.architectures.synthe_vllm import HubStream

    model = seeded(SyntheForCausalLM(SyntheConfig(vocab_size=32, synthe=FIELDS)))
    # [x | position], as the served model feeds it: the hub reads a chunk's first position there.
    return HubStream(model), lambda n: torch.cat([torch.randn(n, FIELDS["d_model"]), torch.arange(n)[:, None]], -1)


ARCHITECTURES = {"causal_bank": causal_bank, "tkc": tkc, "synthe_block": synthe_block, "synthe_hub": synthe_hub}


# ---- a served layer driven step by step ---------------------------------------------------------------------
@dataclass
class Request:
    slot: int
    tokens: torch.Tensor  # every input row it will feed, (n, ...)
    done: int = 0  # rows already computed


class Engine:
    """One RecurrentStateLayer, its state slots, its metadata builder: what vLLM's runner holds for it."""

    def __init__(self, architecture, cudagraph_mode: CUDAGraphMode = CUDAGraphMode.NONE) -> None:
        self.config = VllmConfig()
        self.config.cache_config.mamba_block_size = 4096
        self.config.cache_config.mamba_cache_mode = "none"
        self.config.compilation_config.cudagraph_mode = cudagraph_mode
        self.layer = RecurrentStateLayer(architecture, "layers.0.recurrent", self.config)
        # Slots hold garbage, as reused slots do: a fresh request must not read its slot.
        g = torch.Generator().manual_seed(1)
        self.states = [torch.randn(SLOTS, *s, generator=g) for s in self.layer.get_state_shape()]
        self.layer.kv_cache = tuple(on_device(s) for s in self.states)
        backend = self.layer.get_attn_backend()
        self.builder = backend.get_builder_cls()(self.layer.get_kv_cache_spec(self.config), [self.layer.prefix],
                                                 self.config, torch.device("cpu"))

    def common(self, rows: list[tuple[Request, int]]) -> CommonAttentionMetadata:
        """rows: (request, tokens this step), decodes first, as vLLM orders a batch."""
        query = torch.tensor([0] + [n for _, n in rows]).cumsum(0).int()
        seq_lens = torch.tensor([r.done + n for r, n in rows]).int()
        prefilling = torch.tensor([n > 1 or r.done == 0 for r, n in rows])
        return CommonAttentionMetadata(
            query_start_loc=on_device(query), query_start_loc_cpu=query.clone(), seq_lens=on_device(seq_lens),
            num_reqs=len(rows), num_actual_tokens=int(query[-1]), max_query_len=max(n for _, n in rows),
            max_seq_len=int(seq_lens.max()), block_table_tensor=on_device(torch.tensor([[r.slot] for r, _ in rows]).int()),
            slot_mapping=on_device(torch.zeros(int(query[-1]), dtype=torch.long)), is_prefilling=prefilling,
            seq_lens_cpu_upper_bound=seq_lens.clone())

    def step(self, rows: list[tuple[Request, int]], capture: bool = False) -> list[torch.Tensor]:
        common = self.common(rows)
        metadata = (self.builder.build_for_cudagraph_capture(common) if capture else self.builder.build(0, common))
        inputs = torch.cat([r.tokens[r.done:r.done + n] for r, n in rows])
        arch = self.layer.architecture
        width = arch.stream(inputs[None, :1], arch.zero_states(1, inputs.device))[0].shape[-1]
        output = torch.full((inputs.shape[0], width), float("nan"))
        with set_forward_context({self.layer.prefix: metadata}, self.config), NoHostReads():
            self.layer.run(on_device(inputs), on_device(output))
        outs, start = [], 0
        for r, n in rows:
            outs.append(output[start:start + n])
            start, r.done = start + n, r.done + n
        return outs


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding (other chunkings add in other orders)."""
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def reference(architecture, request: Request) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The architecture's own forward over the request's whole input from a fresh state."""
    inputs = request.tokens[:request.done]
    with torch.no_grad():
        hidden, states = architecture.stream(inputs[None], architecture.zero_states(1, inputs.device))
    return hidden[0].float(), states


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_a_step_reads_nothing_on_the_host_and_equals_the_whole_sequence_forward(name):
    architecture, draw = ARCHITECTURES[name]()
    torch.manual_seed(2)
    engine = Engine(architecture)
    a, b, c, d = (Request(slot, draw(12)) for slot in (2, 4, 5, 7))
    got = {id(r): [] for r in (a, b, c, d)}
    with torch.no_grad():
        # Prefills of one step run together in segments, shortest first (fresh ones, then continuing ones).
        for rows in ([(a, 5), (b, 3), (c, 4), (d, 2)],  # four fresh prompts (c's and d's first chunks)
                     [(a, 1), (b, 1), (c, 3), (d, 4)],  # two decodes, c and d continue their prompts
                     [(a, 1), (b, 1), (c, 1), (d, 1)],  # decodes only
                     [(d, 1), (a, 1), (c, 1), (b, 1)]):  # decodes in another order
            for (r, _), out in zip(rows, engine.step(rows)):
                got[id(r)].append(out)
    for r in (a, b, c, d):
        want, states = reference(architecture, r)
        close(torch.cat(got[id(r)]), want)
        for kept, s in zip(engine.states, states):
            close(kept[r.slot], s[0])


def test_a_decode_step_built_for_cuda_graph_capture_reads_vllms_persistent_slots():
    """With full CUDA graphs on, the decode slots come from the builder's persistent buffer (what a captured
    graph reads at replay, vLLM's Mamba graph support), and the step is still exact."""
    architecture, draw = causal_bank()
    engine = Engine(architecture, CUDAGraphMode.FULL_DECODE_ONLY)
    a, b = Request(3, draw(6)), Request(6, draw(6))
    with torch.no_grad():
        engine.step([(a, 4), (b, 4)])
        common = engine.common([(a, 1), (b, 1)])
        metadata = engine.builder.build_for_cudagraph_capture(common)
        assert metadata.state_indices_tensor_d.data_ptr() == engine.builder.state_indices_tensor_d.data_ptr()
        engine.step([(a, 1), (b, 1)], capture=True)
    for r in (a, b):
        _, states = reference(architecture, r)
        close(engine.states[0][r.slot], states[0][0])


def test_the_guard_catches_a_host_read():
    """The check itself: the old layer's `.tolist()` of query_start_loc, or an `.item()`, fails it."""
    t = on_device(torch.tensor([0, 1, 2]))
    for read in (lambda: t.tolist(), lambda: (t + 1)[0].item(), lambda: bool(t[0]), lambda: t.cpu()):
        with pytest.raises(HostRead):
            read()
    with NoHostReads(), pytest.raises(HostRead):
        torch.arange(3)[torch.tensor([True, False, True])]
