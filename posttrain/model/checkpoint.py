"""HF-format checkpoints for DeepseekV3ForCausalLM: config.json + safetensors (one file, or shards named
model-0000i-of-0000n.safetensors with model.safetensors.index.json), under the names transformers and vLLM use.

In-memory names equal file names except:
- routed experts live stacked in memory (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj`
  [E, D, I]) and per expert in files (`mlp.experts.{e}.{gate,up,down}_proj.weight`);
- MTP module k lives in `model.mtp_layers.{k-1}` and in files as decoder layer `model.layers.{N+k-1}` (N =
  num_hidden_layers), which V3 files complete with copies of the embedding and head (`embed_tokens.weight`,
  `shared_head.head.weight`): we write them, and on load accept but do not need them (they are shared);
- a tied head (`tie_word_embeddings`) is not written.
FP8 files (`weight` in e4m3 + `weight_scale_inv`) load into FP8Linear layers as they are; routed experts, which
run as grouped GEMMs in high precision, are dequantised on load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.model.config import DeepseekV3Config
from posttrain.model.moe import DeepSeekMoE

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERTS = re.compile(r"^(.*\.mlp\.experts\.)(gate_up_proj|down_proj)$")
_MTP = re.compile(r"^model\.mtp_layers\.(\d+)\.")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _file_prefix(name: str, config: DeepseekV3Config) -> str:
    """In-memory name -> file name for MTP layers (model.mtp_layers.k. -> model.layers.{N+k}.)."""
    return _MTP.sub(lambda m: f"model.layers.{config.num_hidden_layers + int(m.group(1))}.", name)


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under file names (views where possible; works on a meta-device model too)."""
    config = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        name = _file_prefix(name, config)
        match = _EXPERTS.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        if kind == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}{e}.up_proj.weight"] = up[e]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = tensor[e]
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for k in range(len(model.model.mtp_layers)):
        layer = f"model.layers.{config.num_hidden_layers + k}."
        out[layer + "embed_tokens.weight"] = model.model.embed_tokens.weight
        out[layer + "shared_head.head.weight"] = model.lm_head.weight
    return out


def _shared_copies(config: DeepseekV3Config) -> set[str]:
    return {
        f"model.layers.{config.num_hidden_layers + k}.{name}"
        for k in range(config.num_nextn_predict_layers)
        for name in ("embed_tokens.weight", "shared_head.head.weight")
    }


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", size.upper())
    if match is None:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or e.g. '5GB', '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def save_pretrained(model: torch.nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    tensors = checkpoint_tensors(model)
    limit, shards, current, current_size = _parse_size(max_shard_size), [], [], 0
    for name in sorted(tensors):
        size = tensors[name].numel() * tensors[name].element_size()
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    shards.append(current)
    if len(shards) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards, strict=True):
        # Copies: safetensors refuses tensors that share storage (expert slices, the MTP embedding/head copies).
        save_file(
            {n: tensors[n].detach().cpu().contiguous().clone() for n in names},
            str(path / file),
            {"format": "pt"},
        )
        weight_map.update(dict.fromkeys(names, file))
    if len(files) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _locate(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE_FILE).exists():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE}")


def _describe(keys: list[str], limit: int = 40) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_pretrained(
    cls: type,
    path: str | Path,
    dtype: torch.dtype | None,
    device: torch.device | str,
    init_missing_mtp: bool,
    **config_overrides: object,
) -> torch.nn.Module:
    path = Path(path)
    config = DeepseekV3Config.from_pretrained(path, **config_overrides)
    dtype = dtype or getattr(torch, config.dtype or "float32")
    with torch.device("meta"):
        model = cls(config, init_weights=False)

    located = _locate(path)
    expected_files = checkpoint_tensors(model)
    expected = set(expected_files) - _shared_copies(config)
    present = set(located)
    fp8_scales = {k for k in present if k.endswith("_scale_inv") and k[: -len("_scale_inv")] in expected}
    missing = sorted(expected - present)
    unexpected = sorted(present - set(expected_files) - fp8_scales)
    mtp_prefixes = tuple(
        f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers)
    )
    mtp_all_missing = bool(mtp_prefixes) and all(k in missing for k in expected if k.startswith(mtp_prefixes))
    if init_missing_mtp and mtp_all_missing:
        missing = [k for k in missing if not k.startswith(mtp_prefixes)]
    if missing or unexpected:
        hint = ""
        if mtp_all_missing:
            hint = (
                " (no MTP layer in the checkpoint: pass init_missing_mtp=True or num_nextn_predict_layers=0)"
            )
        raise KeyError(
            f"checkpoint {path} does not match DeepseekV3ForCausalLM{hint}: "
            f"missing keys [{_describe(missing)}]; unexpected keys [{_describe(unexpected)}]"
        )

    tensors = _read(located, present - _shared_copies(config), device)
    state = _to_model_names(model, tensors, dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    fresh = [k for k in result.missing_keys if init_missing_mtp and k.startswith("model.mtp_layers.")]
    tied = ["lm_head.weight"] if config.tie_word_embeddings else []
    unloaded = [k for k in result.missing_keys if k not in fresh and k not in tied]
    if unloaded or result.unexpected_keys:
        raise KeyError(f"checkpoint {path}: could not load {unloaded + result.unexpected_keys}")
    if fresh:
        model.model.mtp_layers.to_empty(device=device)
        model.init_weights(model.model.mtp_layers)
        model.model.mtp_layers.to(dtype)
    for module in model.modules():
        if isinstance(module, DeepSeekMoE):
            module.expert_load = torch.zeros(config.n_routed_experts, dtype=torch.long, device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _read(located: dict[str, Path], names: set[str], device: torch.device | str) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(located[name], []).append(name)
    out = {}
    for file, file_names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in file_names:
                out[name] = f.get_tensor(name)
    return out


def _to_model_names(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """File tensors -> the model's state dict: stack experts (dequantising FP8 ones), rename MTP layers, cast."""
    config = model.config
    block = tuple((config.quantization_config or {}).get("weight_block_size") or (128, 128))

    def expert_weight(name: str) -> torch.Tensor:
        weight = tensors.pop(name)
        scale = tensors.pop(name + "_scale_inv", None)
        if scale is not None:
            from posttrain.model.fp8 import dequantize_weight

            weight = dequantize_weight(weight, scale, block)
        return weight.to(dtype)

    state = {}
    for name in model.state_dict():
        file_name = _file_prefix(name, config)
        match = _EXPERTS.match(file_name)
        if match is not None:
            prefix, kind = match.groups()
            if f"{prefix}0.down_proj.weight" not in tensors:
                continue  # a fresh MTP layer (init_missing_mtp): key checks happened before reading
            experts = range(config.n_routed_experts)
            if kind == "gate_up_proj":
                gate = torch.stack([expert_weight(f"{prefix}{e}.gate_proj.weight") for e in experts])
                up = torch.stack([expert_weight(f"{prefix}{e}.up_proj.weight") for e in experts])
                state[name] = torch.cat([gate, up], dim=1)
            else:
                state[name] = torch.stack([expert_weight(f"{prefix}{e}.down_proj.weight") for e in experts])
            continue
        for suffix in ("", "_scale_inv"):
            if file_name + suffix in tensors:
                state[name + suffix] = tensors.pop(file_name + suffix)
    for name, tensor in state.items():
        keep = tensor.dtype == torch.float8_e4m3fn or name.endswith(("e_score_correction_bias", "_scale_inv"))
        if tensor.is_floating_point() and not keep:
            state[name] = tensor.to(dtype)
    return state
