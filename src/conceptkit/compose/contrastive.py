"""CLoRA's contrastive loss (§2.4): NT-Xent (InfoNCE) over min-max normalised cross-attention maps.

Written out rather than imported from pytorch-metric-learning; it follows that library's NTXentLoss (2.4.1)
term by term: cosine similarities / τ, one term per ordered positive pair (i, j) whose denominator holds the pair
and i's negatives only (not i's other positives), a max subtracted for stability, `+ finfo.tiny` inside the log,
mean over positive pairs. No positives or no negatives gives 0 with a zero gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ntxent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    e = F.normalize(embeddings, dim=1, eps=1e-12)
    s = e @ e.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    if not positive.any() or not negative.any():
        return embeddings.sum() * 0.0
    neg_inf = torch.finfo(s.dtype).min
    s_neg = s.masked_fill(~negative, neg_inf)
    neg_max = s_neg.max(dim=1, keepdim=True).values  # (M, 1), max over i's negatives
    shift = torch.maximum(s, neg_max).detach()  # per (i, j), as the library's max_val
    numerator = torch.exp(s - shift)
    # Σ_k∈N(i) exp(s_ik − shift_ij) = exp(neg_max_i − shift_ij) · Σ_k exp(s_ik − neg_max_i)
    neg_sum = torch.exp(s_neg - neg_max).masked_fill(~negative, 0).sum(dim=1, keepdim=True)
    denominator = numerator + torch.exp(neg_max - shift) * neg_sum
    terms = -torch.log(numerator / denominator + torch.finfo(s.dtype).tiny)
    return terms[positive].mean()


def map_embeddings(maps: torch.Tensor, groups: list[list[list[int]]], eps: float = 1e-8):
    """maps (K, r_h, r_w, tokens) -> (M, r_h·r_w) min-max normalised token maps and their concept labels."""
    rows, labels = [], []
    for c, per_prompt in enumerate(groups):
        for p, indices in enumerate(per_prompt):
            for k in indices:
                a = maps[p, :, :, k].flatten()
                rows.append((a - a.min()) / (a.max() - a.min() + eps))
                labels.append(c)
    return torch.stack(rows), torch.tensor(labels, device=maps.device)


def clora_loss(maps: torch.Tensor, groups: list[list[list[int]]], temperature: float = 0.5,
               eps: float = 1e-8) -> torch.Tensor:
    embeddings, labels = map_embeddings(maps, groups, eps)
    return ntxent(embeddings, labels, temperature)
