"""One trainer per vLLM shard (Megatron-style tensor parallelism): each trainer's Hugging Face model is a
view of its own worker's shard, and the ranks run forward and backward together with the all-reduces
vLLM's parallel layers do.

Runs in the trainer processes of a server at --tensor-parallel-size N > 1, and in tests. Imports torch and
transformers, never vLLM.

    >>> shard = Shard.join(rank, world, init_method)             # gloo on CPU, NCCL on CUDA
    >>> model = build_hf_view(model_path, weights, shard=shard)  # this rank's part of the model
    >>> logp = token_logprobs(model, model(ids).logits, targets)  # every rank gets the whole answer

vLLM's layout on rank r of N (vllm/model_executor/layers/linear.py, vocab_parallel_embedding.py):
  column-parallel `qkv_proj`, `gate_up_proj`: each stacked projection's output rows in N contiguous
      blocks, so rank r's HF view is the HF model with num_attention_heads / N, num_key_value_heads / N
      and intermediate_size / N (hf_view.py maps it onto the fused tensors as at N = 1);
  row-parallel `o_proj`, `down_proj`: input columns in N blocks; the outputs are summed over ranks;
  vocabulary `embed_tokens`, `lm_head`: the vocabulary padded to a multiple of 64, in N row blocks;
  everything else (norms) whole on every rank.

Forward and backward follow Megatron-LM (Shoeybi et al. 2019): the replicated residual stream enters an
attention or MLP block through `copy_to_shards` (identity; the backward sums the stream's gradient over
ranks) and leaves through `reduce_from_shards` (sum over ranks; the backward passes the gradient as is).
The embedding sums each rank's rows (a token's row lives on one rank), and log-probabilities come from a
vocabulary-parallel log-softmax, so no rank ever holds the whole vocabulary's logits. Every rank then
computes the same loss; replicated weights get the same gradient on every rank and stay equal.

`PARAMETER_SPLITS` is the one rule for which HF parameter is split along which dimension: the optimizer
(apollo.ShardOf) reads it so that a step on the shards is the step one trainer would take on the whole
tensors, and a checkpoint gathers by it.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# vLLM pads the vocabulary to a multiple of this before splitting it (DEFAULT_VOCAB_PADDING_SIZE).
VOCAB_PADDING = 64
# HF module name -> the dimension of its weight (and bias) split over ranks. Not listed: whole on every rank.
PARAMETER_SPLITS = {
    "q_proj": 0, "k_proj": 0, "v_proj": 0, "gate_proj": 0, "up_proj": 0,  # column-parallel: output rows
    "o_proj": 1, "down_proj": 1,  # row-parallel: input columns
    "embed_tokens": 0, "lm_head": 0,  # vocabulary rows
}
# The decoder-only families whose blocks are exactly "norm, attention, norm, MLP" with the layout above.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class TensorParallelError(ValueError):
    """A model this trainer cannot split the way vLLM did (says which dimension and why)."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """This trainer's place among the trainers of one sharded server, and their process group."""

    rank: int
    world: int
    group: object = None  # a torch.distributed process group; None: the default one

    @classmethod
    def join(cls, rank: int, world: int, init_method: str, timeout_s: float = 300.0) -> "Shard":
        """Join the trainers' process group (gloo on CPU, NCCL where CUDA trains)."""
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world)

    def sum_(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over ranks, in place (every rank gets the same bits)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor


class _CopyToShards(torch.autograd.Function):
    """Identity; the backward sums the gradient over ranks (Megatron's f)."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: Shard) -> Tensor:
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.shard.sum_(grad.contiguous().clone()), None


class _ReduceFromShards(torch.autograd.Function):
    """Sum over ranks; the backward passes the (already whole) gradient on (Megatron's g)."""

    @staticmethod
    def forward(ctx, x: Tensor, shard: Shard) -> Tensor:
        return shard.sum_(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_shards(x: Tensor, shard: Shard) -> Tensor:
    return _CopyToShards.apply(x, shard)


def reduce_from_shards(x: Tensor, shard: Shard) -> Tensor:
    return _ReduceFromShards.apply(x, shard)


def padded_vocab(vocab_size: int, world: int) -> int:
    """Rows of the whole (padded) vocabulary tensor split over `world` ranks, as vLLM pads it."""
    padded = -(-vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    if padded % world:
        raise TensorParallelError(f"the padded vocabulary ({padded}) does not split over {world} ranks")
    return padded


class VocabShardEmbedding(nn.Module):
    """embed_tokens on one vocabulary block: rows [start, start + rows) of the padded vocabulary; tokens
    of other blocks give 0 here and their row on their own rank, and the sum over ranks is the embedding."""

    def __init__(self, weight: nn.Parameter, start: int, shard: Shard) -> None:
        super().__init__()
        self.weight, self.start, self.shard = weight, start, shard

    def forward(self, input_ids: Tensor) -> Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_shards(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.shard)


class VocabShardHead(nn.Module):
    """lm_head on one vocabulary block: this rank's logits only, padding rows at -inf. The log-probs of
    the whole vocabulary come from `logprobs` (one max, one sum of exponentials and one target logit
    summed over ranks per token)."""

    def __init__(self, weight: nn.Parameter, start: int, vocab_size: int, shard: Shard) -> None:
        super().__init__()
        self.weight, self.start, self.shard = weight, start, shard
        self.valid = max(0, min(weight.shape[0], vocab_size - start))  # rows past the vocabulary: padding

    def forward(self, hidden_states: Tensor) -> Tensor:
        logits = F.linear(copy_to_shards(hidden_states, self.shard), self.weight)
        if self.valid < self.weight.shape[0]:
            padding = torch.arange(self.weight.shape[0], device=logits.device) >= self.valid
            logits = logits.masked_fill(padding, float("-inf"))
        return logits

    def logprobs(self, logits: Tensor, targets: Tensor) -> Tensor:
        """log p(targets) (global token ids, shape of logits[..., 0]) under the whole vocabulary's softmax."""
        logits = logits.float()
        top = self.shard.max_(logits.detach().amax(-1))  # any constant is exact; the max keeps exp() finite
        sumexp = reduce_from_shards((logits - top.unsqueeze(-1)).exp().sum(-1), self.shard)
        local = targets - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        picked = logits.gather(-1, local.clamp(0, self.weight.shape[0] - 1).unsqueeze(-1)).squeeze(-1)
        target = reduce_from_shards(picked.masked_fill(~mine, 0.0), self.shard)
        return target - top - sumexp.log()


def token_logprobs(model: nn.Module, logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) from `model`'s logits: a plain log-softmax, or the vocabulary-parallel one when the
    model is one rank's shard. The objectives take every log-probability through here."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, VocabShardHead):
        return head.logprobs(logits, targets)
    return torch.gather(torch.log_softmax(logits.float(), -1), -1, targets.unsqueeze(-1)).squeeze(-1)


def local_config(config, world: int):
    """A copy of `config` with this rank's share of heads and MLP width (head_dim kept explicit)."""
    import copy

    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise TensorParallelError(f"training at tensor-parallel size {world} supports {SUPPORTED_MODEL_TYPES}, "
                                  f"not {config.model_type!r}")
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, field) % world:
            raise TensorParallelError(f"{field} = {getattr(config, field)} does not split over {world} ranks "
                                      "(vLLM would replicate KV heads there; training at that size is not supported)")
    local = copy.deepcopy(config)
    local.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    local.num_attention_heads = config.num_attention_heads // world
    local.num_key_value_heads = config.num_key_value_heads // world
    local.intermediate_size = config.intermediate_size // world
    return local


def split_blocks(model: nn.Module, shard: Shard) -> None:
    """Hook every attention and MLP block so the stream enters through copy_to_shards and the block's
    (partial, row-parallel) output leaves summed over ranks."""
    for layer in model.model.layers:
        for block, out in ((layer.self_attn, layer.self_attn.o_proj), (layer.mlp, layer.mlp.down_proj)):
            if out.bias is not None:
                raise TensorParallelError(f"{type(out).__name__} with a bias: each rank would add it once")
            block.register_forward_pre_hook(_enter_hook(shard), with_kwargs=True)
            block.register_forward_hook(_leave_hook(shard))


def _enter_hook(shard: Shard):
    def enter(module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": copy_to_shards(kwargs["hidden_states"], shard)}
        else:
            args = (copy_to_shards(args[0], shard), *args[1:])
        return args, kwargs
    return enter


def _leave_hook(shard: Shard):
    def leave(module, args, output):
        if isinstance(output, tuple):
            return (reduce_from_shards(output[0], shard), *output[1:])
        return reduce_from_shards(output, shard)
    return leave


def split_dimension(name: str) -> int | None:
    """The dimension HF parameter `name` is split along over ranks, None when every rank holds it whole."""
    parts = name.split(".")
    return PARAMETER_SPLITS.get(parts[-2]) if len(parts) >= 2 else None


def parameter_shards(model: nn.Module, shard: Shard) -> dict:
    """{HF name: apollo.ShardOf} for every parameter of this rank's model that is split over ranks."""
    from plasticity_training.apollo import ShardOf

    shards = {}
    for name, p in model.named_parameters():
        dim = split_dimension(name)
        if dim is not None:
            full = list(p.shape)
            full[dim] *= shard.world
            shards[name] = ShardOf(tuple(full), dim, shard.rank * p.shape[dim])
    return shards


def whole_shapes(model: nn.Module, shard: Shard, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """{HF name: its shape in the whole model} (the vocabulary unpadded, as a one-shard view holds it)."""
    shapes = {}
    for name, p in model.named_parameters():
        shape, dim = list(p.shape), split_dimension(name)
        if dim is not None:
            shape[dim] = vocab_size if is_vocabulary(name) else shape[dim] * shard.world
        shapes[name] = tuple(shape)
    return shapes


def is_vocabulary(name: str) -> bool:
    return name.split(".")[-2] in ("embed_tokens", "lm_head") if "." in name else False


def gather_whole(tensors: dict[str, Tensor], shard: Shard, shapes: dict[str, tuple[int, ...]],
                 dims: dict[str, int | None]) -> dict[str, Tensor]:
    """The whole tensors on rank 0 ({} on the others): each of `tensors` split along `dims[name]` is
    gathered from every rank and cut to `shapes[name]` (vocabulary padding dropped); one collective per
    split tensor, in the order of `tensors` (the same on every rank)."""
    whole = {}
    for name, local in tensors.items():
        dim = dims.get(name)
        if dim is None:
            whole[name] = local
            continue
        parts = [torch.empty_like(local) for _ in range(shard.world)]
        dist.all_gather(parts, local.contiguous(), group=shard.group)
        if shard.rank == 0:
            whole[name] = torch.cat(parts, dim).narrow(dim, 0, shapes[name][dim])
    return whole if shard.rank == 0 else {}


def local_part(whole: Tensor, dim: int | None, start: int, rows: int) -> Tensor:
    """This rank's `rows` along `dim` from `start` of a whole tensor (zeros past its end: vocabulary padding)."""
    if dim is None:
        return whole
    have = max(0, min(rows, whole.shape[dim] - start))
    part = whole.narrow(dim, start, have)
    if have < rows:
        pad = list(whole.shape)
        pad[dim] = rows - have
        part = torch.cat([part, whole.new_zeros(pad)], dim)
    return part.clone()
