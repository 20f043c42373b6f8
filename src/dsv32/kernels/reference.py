"""Plain-torch references for the attention kernels: small, obviously right, and slow.

Shapes (absorbed / MQA form, one latent KV head shared by all query heads):

    q        (B, T, H, C)    C = r_kv + d_r: the absorbed query [W_uk^T q_n ; q_r]
    kv       (B, S, C)       the latent cache [c_kv ; k_r]
    indices  (B, T, K)       selected key slots per query, -1 = empty slot
    out      (B, T, H, Dv)   Dv = r_kv: attention-weighted sum of c_kv
    lse      (B, T, H)       log-sum-exp of the scaled scores (-inf for a query with no keys)

These build the full (B, H, T, S) score tensor; they exist to test the fast paths.
"""

from __future__ import annotations

import torch


def indices_to_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean (B, T, S) mask, True at the selected key slots (-1 entries ignored)."""
    B, T, K = indices.shape
    mask = torch.zeros(B, T, num_keys + 1, dtype=torch.bool, device=indices.device)
    slots = torch.where(indices >= 0, indices, num_keys)  # empty slots land in a spare column
    mask.scatter_(-1, slots.long(), True)
    return mask[..., :num_keys]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of q (B, T, H, Dk) over k (B, S, [H,] Dk), v (B, S, [H,] Dv) restricted to
    `mask` (B, T, S). A query with no allowed key gets output 0 and lse -inf. Float32 math."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if kf.dim() == 3:
        scores = torch.einsum("bthc,bsc->bhts", qf, kf)
    else:
        scores = torch.einsum("bthc,bshc->bhts", qf, kf)
    scores = scores * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T)
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    if vf.dim() == 3:
        out = torch.einsum("bhts,bsc->bthc", probs, vf)
    else:
        out = torch.einsum("bhts,bshc->bthc", probs, vf)
    return out, lse.transpose(1, 2)


def sparse_mla_reference(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, scale: float,
                         dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse absorbed-MLA attention, computed densely with a mask built from `indices`."""
    mask = indices_to_mask(indices, kv.shape[1])
    return masked_attention(q, kv, kv[..., :dv], mask, scale)
