"""Balance losses of DeepSeekMoE, built from the routing statistics the gate op returns.

Both take ``tokens_per_expert`` [S, E] (how many of each sequence's token copies chose expert e)
and ``score_sums`` [S, E] (the sum over each sequence's tokens of the softmax scores s_{e,t}),
S sequences of L tokens each (S = 1 for the token-level variant, L = all tokens). With k experts
per token:

    f_e = E / (k L) * tokens_per_expert[s, e]       (1 when the load is uniform)
    P_e = score_sums[s, e] / L                      (mean score)

* expert level (the paper's L_ExpBal = alpha_1 sum_e f_e P_e), averaged over sequences: the
  seeds' MoEGate with ``seq_aux`` (S = batch) or without (S = 1);
* device level (L_DevBal = alpha_2 sum_d f'_d P'_d) with the experts in D contiguous groups,
  f'_d = mean of f_e over the group, P'_d = sum of P_e over the group.

Gradients flow through ``score_sums`` only (the counts are integers), as in the seeds.
"""
from __future__ import annotations

from torch import Tensor, nn


def _check_stats(name: str, tokens_per_expert: Tensor, score_sums: Tensor) -> None:
    if tokens_per_expert.dim() != 2 or score_sums.dim() != 2:
        raise ValueError(
            f"{name}: tokens_per_expert and score_sums must be [num_seqs, num_experts], got "
            f"{tuple(tokens_per_expert.shape)} and {tuple(score_sums.shape)}"
        )
    if tokens_per_expert.shape != score_sums.shape:
        raise ValueError(
            f"{name}: tokens_per_expert {tuple(tokens_per_expert.shape)} and score_sums "
            f"{tuple(score_sums.shape)} must have the same shape"
        )


def expert_balance_loss(tokens_per_expert: Tensor, score_sums: Tensor, k: int, seq_len: int, alpha: float) -> Tensor:
    """alpha * mean over sequences of sum_e f_e P_e (see the module docstring)."""
    _check_stats("expert_balance_loss", tokens_per_expert, score_sums)
    E = score_sums.shape[1]
    f = tokens_per_expert.to(score_sums.dtype) * (E / (k * seq_len))
    P = score_sums / seq_len
    return (f * P).sum(dim=1).mean() * alpha


def device_balance_loss(
    tokens_per_expert: Tensor, score_sums: Tensor, k: int, seq_len: int, num_devices: int, alpha: float
) -> Tensor:
    """alpha * mean over sequences of sum_d f'_d P'_d, experts in ``num_devices`` contiguous
    groups of E/D (expert e on device e // (E/D))."""
    _check_stats("device_balance_loss", tokens_per_expert, score_sums)
    S, E = score_sums.shape
    if num_devices < 1 or E % num_devices:
        raise ValueError(f"device_balance_loss: num_devices={num_devices} must divide num_experts={E}")
    f = tokens_per_expert.to(score_sums.dtype) * (E / (k * seq_len))
    P = score_sums / seq_len
    f_dev = f.view(S, num_devices, E // num_devices).mean(dim=2)
    P_dev = P.view(S, num_devices, E // num_devices).sum(dim=2)
    return (f_dev * P_dev).sum(dim=1).mean() * alpha


class LoadBalanceLoss(nn.Module):
    """Expert-level balance loss (the seeds' README name): alpha_1 * sum_e f_e P_e."""

    def __init__(self, num_experts: int, k: int, alpha: float) -> None:
        super().__init__()
        self.num_experts, self.k, self.alpha = num_experts, k, float(alpha)

    def forward(self, tokens_per_expert: Tensor, score_sums: Tensor, seq_len: int) -> Tensor:
        return expert_balance_loss(tokens_per_expert, score_sums, self.k, seq_len, self.alpha)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, alpha={self.alpha}"


class DeviceBalanceLoss(nn.Module):
    """Device-level balance loss (the seeds' README name): alpha_2 * sum_d f'_d P'_d over
    ``num_devices`` contiguous groups of experts."""

    def __init__(self, num_experts: int, k: int, num_devices: int, alpha: float) -> None:
        super().__init__()
        if num_devices < 1 or num_experts % num_devices:
            raise ValueError(f"DeviceBalanceLoss: num_devices={num_devices} must divide num_experts={num_experts}")
        self.num_experts, self.k, self.num_devices, self.alpha = num_experts, k, num_devices, float(alpha)

    def forward(self, tokens_per_expert: Tensor, score_sums: Tensor, seq_len: int) -> Tensor:
        return device_balance_loss(tokens_per_expert, score_sums, self.k, seq_len, self.num_devices, self.alpha)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, num_devices={self.num_devices}, alpha={self.alpha}"


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross entropy as in the seeds' causal LM: logits[:, :-1] predict
    labels[:, 1:], positions labelled ``ignore_index`` are skipped; computed in fp32."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)


__all__ = [
    "expert_balance_loss",
    "device_balance_loss",
    "LoadBalanceLoss",
    "DeviceBalanceLoss",
    "lm_loss",
]
