"""Multi-Token Prediction (DeepSeek-V3 report, Sec. 2.2, Eq. 21-25).

Module k (k = 1..D) at position i combines the previous depth's representation with the embedding of the token
k steps ahead, runs one Transformer block and predicts token i + 1 + k with the shared output head:

    h'^k_i = M_k [RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(t_{i+k}))]        (Eq. 21; M_k is d x 2d)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                (Eq. 22)
    P^k_{i+k+1} = OutHead(h^k_i)                                     (Eq. 23)
    L_MTP = lambda / D * sum_k CrossEntropy(P^k, t)                   (Eq. 24-25)

h^0 is the main model's final hidden state (after its final norm, what the head sees). Checkpoint layout (V3,
vLLM, transformers): module k is stored as decoder layer `num_hidden_layers + k - 1` with extra `enorm` (the
embedding's norm), `hnorm`, `eh_proj` (its input is [enorm(emb) ; hnorm(h)], embedding first, which is the
released weights' order) and `shared_head.norm`; V3 files also repeat `embed_tokens` and `shared_head.head`,
which are the main model's embedding and head (shared, not copied, here).

`attach_mtp` adds the same modules to a plain transformers causal LM (Qwen2, Llama, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.model.block import DecoderLayer
from posttrain.model.config import DeepseekV3Config
from posttrain.model.layers import RMSNorm, make_linear, packed_causal_mask


def combine(
    enorm: nn.Module, hnorm: nn.Module, eh_proj: nn.Module, h_prev: torch.Tensor, emb: torch.Tensor
) -> torch.Tensor:
    """Eq. 21: M_k [RMSNorm(h^{k-1}) ; RMSNorm(Emb(t_{i+k}))], in the released weights' [emb ; h] order."""
    return eh_proj(torch.cat([enorm(emb), hnorm(h_prev)], dim=-1))


class SharedHead(nn.Module):
    """`shared_head.norm` of a V3 MTP layer; the head itself is the main model's `lm_head`."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 MTP module: a decoder block (inherited, so its weights carry the block's names) plus enorm,
    hnorm, eh_proj and shared_head.norm."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = make_linear(config, 2 * config.hidden_size, config.hidden_size)
        self.shared_head = SharedHead(config.hidden_size, config.rms_norm_eps)

    def combine(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return combine(self.enorm, self.hnorm, self.eh_proj, h_prev, emb)


def mtp_loss(
    mtp_logits: list[torch.Tensor],
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    weight: float = 0.3,
    ignore_index: int = -100,
) -> torch.Tensor:
    """L_MTP = weight / D * sum_k mean_i CE(mtp_logits[k-1][:, i], t_{i+1+k})   (Eq. 24-25).

    `labels` [B, L] are the main model's targets (labels[:, i] = token i+1, `ignore_index` where none), so depth
    k's target at i is labels[:, i+k]. With packed rows (`position_ids` restarting per sample) a target from
    another sample is dropped: it is kept only where position_ids[i+k] == position_ids[i] + k.
    """
    total = labels.new_zeros((), dtype=torch.float32)
    for k, logits in enumerate(mtp_logits, start=1):
        n = logits.shape[1]
        target = labels[:, k : k + n].clone()
        if position_ids is not None:
            same_sample = position_ids[:, k : k + n] == position_ids[:, :n] + k
            target[~same_sample] = ignore_index
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), target.flatten(), ignore_index=ignore_index, reduction="sum"
        )
        total = total + ce / (target != ignore_index).sum().clamp(min=1)
    return weight * total / max(len(mtp_logits), 1)


# --------------------------------------------------------------------------- MTP for transformers models
MTP_WEIGHTS = "mtp.safetensors"
MTP_CONFIG = "mtp_config.json"


class MTPBlock(nn.Module):
    """One MTP module around a transformers decoder layer: enorm, hnorm, eh_proj, block, norm."""

    def __init__(self, block: nn.Module, norm_cls: type[nn.Module], hidden_size: int, eps: float) -> None:
        super().__init__()
        self.enorm = norm_cls(hidden_size, eps=eps)
        self.hnorm = norm_cls(hidden_size, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block
        self.norm = norm_cls(hidden_size, eps=eps)


class AttachedMTP(nn.Module):
    """D MTP modules for a transformers causal LM whose embedding and lm_head they share (not copy).

    Each block is a fresh instance of the model's own decoder-layer class, initialised from its last layer;
    each output norm starts as a copy of its final norm; eh_proj is random (std = initializer_range).
    Saved next to the HF model as `mtp.safetensors` (keys `layers.{k-1}.{enorm,hnorm,eh_proj,block.*,norm}`)
    plus `mtp_config.json` ({"depth": D, "layer_class": ...}); `attach_mtp(model, path=dir)` loads them.
    The model's attention implementation must accept an additive 4-D mask (eager or sdpa).
    """

    def __init__(self, hf_model: nn.Module, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"attach_mtp: depth must be >= 1, got {depth}")
        config = hf_model.config
        decoder = hf_model.get_decoder()
        last = decoder.layers[-1]
        eps = getattr(config, "rms_norm_eps", 1e-6)
        blocks = []
        for _ in range(depth):
            block = type(last)(config, len(decoder.layers) - 1)
            block.load_state_dict(last.state_dict())
            mtp_block = MTPBlock(block, type(decoder.norm), config.hidden_size, eps)
            mtp_block.norm.load_state_dict(decoder.norm.state_dict())
            nn.init.normal_(mtp_block.eh_proj.weight, std=getattr(config, "initializer_range", 0.02))
            blocks.append(mtp_block)
        param = next(hf_model.parameters())
        self.layers = nn.ModuleList(blocks).to(device=param.device, dtype=param.dtype)
        self.depth = depth
        self.layer_class = type(last).__name__
        self._main = (hf_model,)  # a tuple: the shared model is not registered as a submodule

    def forward(
        self, hidden_states: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """hidden_states [B, L, D]: the main model's final hidden states (`model.model(...).last_hidden_state`,
        after its final norm). Returns logits per depth k: [B, L-k, V], position i predicting token i+1+k."""
        main = self._main[0]
        decoder = main.get_decoder()
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
        out, h_prev = [], hidden_states
        for k, layer in enumerate(self.layers, start=1):
            n = length - k
            if n <= 0:
                break
            pos = position_ids[:, :n]
            x = combine(
                layer.enorm,
                layer.hnorm,
                layer.eh_proj,
                h_prev[:, :n],
                main.get_input_embeddings()(input_ids[:, k:]),
            )
            allowed = packed_causal_mask(pos)
            if allowed is None:
                allowed = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
            additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed, torch.finfo(x.dtype).min
            )
            x = layer.block(
                x, attention_mask=additive, position_ids=pos, position_embeddings=decoder.rotary_emb(x, pos)
            )
            out.append(main.get_output_embeddings()(layer.norm(x)))
            h_prev = x
        return out

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / MTP_WEIGHTS))
        (path / MTP_CONFIG).write_text(
            json.dumps({"depth": self.depth, "layer_class": self.layer_class}) + "\n"
        )


def attach_mtp(hf_model: nn.Module, depth: int = 1, path: str | Path | None = None) -> AttachedMTP:
    """MTP modules for a transformers causal LM (see `AttachedMTP`); with `path`, load the ones saved there by
    `AttachedMTP.save_pretrained` (their depth wins over `depth`)."""
    if path is None:
        return AttachedMTP(hf_model, depth)
    path = Path(path)
    try:
        meta = json.loads((path / MTP_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"attach_mtp: cannot read {path / MTP_CONFIG}: {err}") from err
    mtp = AttachedMTP(hf_model, int(meta["depth"]))
    if meta.get("layer_class") != mtp.layer_class:
        raise ValueError(
            f"{path / MTP_CONFIG}: saved for {meta.get('layer_class')}, model has {mtp.layer_class}"
        )
    state = load_file(str(path / MTP_WEIGHTS), device=str(next(hf_model.parameters()).device))
    expected = set(mtp.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"{path / MTP_WEIGHTS}: missing keys {missing}, unexpected keys {unexpected}")
    mtp.load_state_dict(state)
    return mtp
