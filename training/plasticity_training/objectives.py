"""The /train objectives: supervised continuation loss and two preference losses, weighted per sample.

Runs in the trainer process (trainer_core.py). Each loss takes per-sample sums of continuation-token
log-probabilities (`continuation_logprobs`: one padded forward for every sequence of the job) and the
samples' weights, and returns a scalar to minimise plus what the answer reports.

    sft   mean negative log-likelihood of the continuation tokens:  sum_i w_i nll_i / sum_i w_i n_i
    dpo   Rafailov et al. 2023:  -log sigmoid(beta * ((c - c_ref) - (r - r_ref)))      c, r: summed log-probs
    orpo  Hong et al. 2024:  nll(chosen) / n_chosen + lambda * -log sigmoid(log odds(chosen) - log odds(rejected)),
          odds(y) = p / (1 - p) with p = exp(mean token log-prob of y), the length-normalised likelihood
dpo and orpo are averaged over samples with weights w_i / sum w. A sample of weight 0 never reaches these
functions (the trainer drops it, so it moves no weight, momentum included).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from plasticity_training.tensor_parallel import token_logprobs


@dataclasses.dataclass
class ObjectiveResult:
    loss: Tensor  # scalar, to minimise
    chosen_logp: float | None = None  # preference objectives: mean over samples of log p(chosen | context)
    rejected_logp: float | None = None
    margin: float | None = None  # dpo: the implicit reward margin; orpo: the log odds ratio (sample mean)


def sft_loss(logp_sums: Tensor, counts: Tensor, weights: Tensor) -> ObjectiveResult:
    """logp_sums, counts, weights: (N,). Token-weighted mean NLL, each sample's tokens weighted by w_i."""
    return ObjectiveResult(-(weights * logp_sums).sum() / (weights * counts).sum())


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             weights: Tensor) -> ObjectiveResult:
    """chosen, rejected, ref_*: (N,) summed continuation log-probs under the policy and the reference."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (N,)
    w = weights / weights.sum()
    return ObjectiveResult((w * -F.logsigmoid(margins)).sum(), float((w * chosen).sum()),
                           float((w * rejected).sum()), float((w * margins).sum()))


def orpo_loss(chosen: Tensor, chosen_counts: Tensor, rejected: Tensor, rejected_counts: Tensor, lam: float,
              weights: Tensor) -> ObjectiveResult:
    """chosen, rejected: (N,) summed log-probs; *_counts: (N,) token counts."""
    mean_c, mean_r = chosen / chosen_counts, rejected / rejected_counts  # (N,) log p, length-normalised
    log_odds = _log_odds(mean_c) - _log_odds(mean_r)  # (N,)
    per_sample = -mean_c + lam * -F.logsigmoid(log_odds)
    w = weights / weights.sum()
    return ObjectiveResult((w * per_sample).sum(), float((w * chosen).sum()), float((w * rejected).sum()),
                           float((w * log_odds).sum()))


def _log_odds(logp: Tensor) -> Tensor:
    """log(p / (1 - p)) from log p < 0, without forming 1 - p where p is close to 1."""
    return logp - torch.log(-torch.expm1(logp))


def continuation_logprobs(model, pad_id: int, contexts: list[list[int]], continuations: list[list[int]]
                          ) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each continuation given its context, and its token count: (N,), (N,) float32.

    One right-padded forward over every context + continuation (the gradient flows through the context's
    keys and values too: exact, like the `masked` context mode)."""
    seqs = [c + y for c, y in zip(contexts, continuations)]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (N, T)
    on = torch.zeros((len(seqs), T), dtype=torch.bool)  # (N, T): positions whose token the loss is on
    for n, (c, seq) in enumerate(zip(contexts, seqs)):
        ids[n, : len(seq)] = torch.tensor(seq)
        mask[n, : len(seq)] = 1
        on[n, len(c): len(seq)] = True
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (N, T-1, V): predicts t+1
    token_logp = token_logprobs(model, logits, ids[:, 1:])  # (N, T-1); a sharded model's own softmax
    on = on[:, 1:]
    return (token_logp * on).sum(1), on.sum(1).float()
