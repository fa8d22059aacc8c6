"""DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 report, Sec. 2.1.2, Eq. 12-20).

    h'_t = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_i,t FFN^(r)_i(u_t)                     (Eq. 12)
    s_i,t = sigmoid(u_t . e_i)                                                        (Eq. 15)
    g_i,t = s_i,t / sum_{j in TopK} s_j,t * routed_scaling_factor,  0 if i not selected (Eq. 13-14)
    TopK is taken over s_i,t + b_i (Eq. 16): the bias b_i steers *selection only*, never the gate value.

Group-limited routing (node-limited in the report): experts fall into n_group groups; a group scores the sum of
its two best biased affinities, and only the topk_group best groups may be chosen. Balancing: the trainer calls
`update_expert_bias` after each optimiser step, b_i -= gamma * sign(load_i - mean load), load counted over the
global batch. No token is dropped.

Routed experts are stored stacked ([E, 2I, D] gate|up and [E, D, I] down, the layout of transformers'
in-memory DeepseekV3Experts) and run as grouped GEMMs over tokens sorted by expert; checkpoints still name
each expert separately (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from posttrain.model.config import DeepseekV3Config
from posttrain.model.layers import MLP

_recomputing = False


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Marks a forward that activation checkpointing re-runs during backward: its routing is not counted again
    in the expert loads (pass as the recompute half of `torch.utils.checkpoint`'s `context_fn`)."""
    global _recomputing
    previous, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = previous


def group_limited_topk(
    biased_scores: torch.Tensor, n_group: int, topk_group: int, top_k: int
) -> torch.Tensor:
    """Indices [T, top_k] of the experts chosen from biased affinities [T, E]: keep the topk_group groups with the
    largest sum of their two best scores, then the top_k experts inside them."""
    tokens, experts = biased_scores.shape
    if n_group > 1:
        grouped = biased_scores.view(tokens, n_group, experts // n_group)
        group_scores = grouped.topk(min(2, experts // n_group), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        biased_scores = grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, experts)
    return biased_scores.topk(top_k, dim=-1).indices


class MoEGate(nn.Module):
    """Router: `weight` [E, D] (the centroids e_i) and `e_score_correction_bias` [E] (b_i, kept in float32)."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32)
        )

    def _apply(self, fn: Callable, recurse: bool = True) -> MoEGate:
        # Module.to(bf16) would cast the bias too, and +-gamma = 1e-3 steps vanish in bf16 once |b| > 0.25:
        # the bias follows the module's device, never its dtype (transformers keeps it in float32 as well).
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        self.e_score_correction_bias = moved.float() if bias.is_meta else bias.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> gate values [T, k] (x's dtype), expert indices [T, k], affinities s [T, E] (float32)."""
        cfg = self.config
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():
            indices = group_limited_topk(
                scores + self.e_score_correction_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok
            )
        gates = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return (gates * cfg.routed_scaling_factor).type_as(x), indices, scores


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows x[offsets[e-1]:offsets[e]] times weight[e]^T for every expert e, in one grouped GEMM.

    x [N, K] sorted by expert, weight [E, M, K], offsets [E] int32 cumulative row counts -> [N, M].
    `torch._grouped_mm` runs on CUDA in bf16 and on CPU (torch >= 2.9); elsewhere a loop over experts (never
    over tokens) gives the same result.
    """
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if hasattr(torch, "_grouped_mm") and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return expert_loop_linear(x, weight, offsets)


def expert_loop_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference for `grouped_linear`: one matmul per expert on its contiguous slice of rows."""
    outputs, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        outputs.append(x[start:end] @ weight[expert].T)
        start = end
    return torch.cat(outputs)


class RoutedExperts(nn.Module):
    """E SwiGLU experts: gate_up_proj [E, 2I, D] (gate rows then up rows), down_proj [E, D, I]."""

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))
        self.linear = grouped_linear

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert, offsets [E] cumulative counts -> [N, D]."""
        gate, up = self.linear(x, self.gate_up_proj, offsets).chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, self.down_proj, offsets)


class DeepSeekMoE(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.config = config
        self.gate = MoEGate(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Tokens routed to each expert since the last bias update (training forwards only); an integer buffer, so
        # that Module.to(bf16) leaves the counts exact.
        self.register_buffer(
            "expert_load", torch.zeros(config.n_routed_experts, dtype=torch.long), persistent=False
        )

    def forward(
        self, x: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, L, D] -> (output [B, L, D], sequence-wise balance loss or None). `sample_ids` [B, L] delimits the
        packed samples the balance loss treats as sequences (one per row when None)."""
        batch, length, dim = x.shape
        flat = x.reshape(-1, dim)
        gates, indices, scores = self.gate(flat)

        # Sort the (token, slot) pairs by expert so every expert reads one contiguous block of rows, then put the
        # results back in (token, slot) order and take each token's gate-weighted sum as one small bmm:
        # deterministic, unlike a scatter-add.
        top_k = indices.shape[1]
        experts_flat = indices.flatten()
        order = experts_flat.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # scatter_add rather than bincount: bincount syncs with the host on CUDA to size its output.
        counts = torch.zeros(self.config.n_routed_experts, dtype=torch.long, device=x.device)
        counts.scatter_add_(0, experts_flat, torch.ones_like(experts_flat))
        offsets = counts.cumsum(0).to(torch.int32)
        routed = self.experts(flat[order // top_k], offsets)[inverse].view(-1, top_k, dim)
        out = torch.bmm(gates.unsqueeze(1), routed).squeeze(1)

        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux_loss = None
        if self.training and not _recomputing:
            self.expert_load += counts
        if self.training and self.config.aux_loss_alpha > 0 and self.config.seq_aux:
            segments = sample_ids if sample_ids is not None else torch.zeros_like(x[..., 0], dtype=torch.long)
            aux_loss = sequence_balance_loss(
                scores, indices, segments, self.config.num_experts_per_tok, self.config.aux_loss_alpha
            )
        return out.view(batch, length, dim), aux_loss


def sequence_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, sample_ids: torch.Tensor, top_k: int, alpha: float
) -> torch.Tensor:
    """Sequence-wise balance loss (report Eq. 17-20), averaged over the sequences of the batch:

        L_Bal = alpha * sum_i f_i P_i,   f_i = N_r / (K_r T) * sum_t 1[i in TopK(t)],
        P_i = 1/T * sum_t s'_i,t,        s'_i,t = s_i,t / sum_j s_j,t

    scores [B*L, E] sigmoid affinities, indices [B*L, K_r] selected experts, sample_ids [B, L] (0-based per row
    and < L, as `posttrain.model.layers.sample_ids` gives them) make each packed sample its own sequence.
    Selection carries no gradient; P does. Sequence (row b, sample s) is slot b·L + s of B·L slots, so every
    size is known on the host: no device-to-host sync (counting the sequences would cost one per MoE layer).
    """
    tokens, experts = scores.shape
    rows, length = sample_ids.shape
    segment = (torch.arange(rows, device=sample_ids.device)[:, None] * length + sample_ids).flatten()
    seq_len = torch.zeros(tokens, dtype=scores.dtype, device=scores.device).index_add_(
        0, segment, torch.ones_like(segment, dtype=scores.dtype)
    )[:, None]
    present = seq_len > 0  # slots that hold a sequence
    selected = torch.zeros_like(scores).scatter_(1, indices, 1.0)
    f = torch.zeros_like(scores).index_add_(0, segment, selected) * experts / (top_k * seq_len.clamp(min=1))
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    p = torch.zeros_like(scores).index_add_(0, segment, normalised) / seq_len.clamp(min=1)
    return alpha * (f * p).sum(-1).sum() / present.sum()


@torch.no_grad()
def update_expert_bias(
    model: nn.Module, gamma: float | None = None, process_group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """Auxiliary-loss-free balancing step (report Sec. 2.1.2): for every DeepSeekMoE layer of `model`,
    b_i -= gamma * sign(load_i - mean load), where load_i counts the tokens routed to expert i by the training
    forwards since the last call, summed over all ranks (one all-reduce for all layers when torch.distributed
    is initialised). gamma defaults to the config's `bias_update_speed`. Call after each optimiser step.

    Returns {"max_over_mean_load": worst layer's max_i load_i / mean load, "tokens": routed slots seen}.
    """
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    if not layers:
        return {"max_over_mean_load": 1.0, "tokens": 0.0}
    loads = torch.stack([m.expert_load for m in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, group=process_group)
    loads = loads.double()
    mean = loads.mean(dim=-1, keepdim=True)
    for layer, load, layer_mean in zip(layers, loads, mean, strict=True):
        speed = layer.config.bias_update_speed if gamma is None else gamma
        layer.gate.e_score_correction_bias -= speed * torch.sign(load - layer_mean).float()
        layer.expert_load.zero_()
    worst = (loads.max(dim=-1).values / mean.squeeze(-1).clamp(min=1e-9)).max()
    return {"max_over_mean_load": float(worst), "tokens": float(loads[0].sum())}
