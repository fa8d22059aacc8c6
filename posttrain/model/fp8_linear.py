"""FP8 linear layers that train: DeepSeek-V3's recipe (report §3.3, Fig. 6) over the format and GEMM of
`posttrain.model.fp8`, and the conversion of a model's nn.Linear layers to it.

`FP8Linear` keeps a master weight in bf16/fp32; all three GEMMs run in FP8:
    forward  y  = x Wᵀ    x: 1×128 tiles along K,   W: 128×128 blocks
    dgrad    dx = dy W    dy: 1×128 tiles along N,  W: the same blocks, transposed
    wgrad    dW = dyᵀ x   dy and x: 128×1 tiles along the token dimension (the reduction of this GEMM)
Embeddings, the output head, the MoE router, norms and attention stay in higher precision. x and dy are each
quantised once for both of their tilings (`quantize_rows_and_columns`). Inside `torch.compile`d blocks the layer is
part of the graph: the GEMM and that quantisation are custom operators, and the weight's blocks, quantised once per
optimiser step, are refreshed outside the graph by the block's pre-hook (`refresh_quantized_weights_before`).
"""

import math
from collections.abc import Callable

import torch
from torch import nn

from posttrain.model.fp8 import (
    FP8_DTYPE,
    dequantize_weight,
    fp8_block_matmul,
    quantize_blocks,
    quantize_blocks_both_layouts,
    quantize_rows_and_columns,
    quantize_weight,
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an nn.Linear would return for x: autocast's where it is on (bf16 under the trainers' mixed
    precision), else x's own. FP8 GEMMs write their output in it directly, with no cast pass after them."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _FP8LinearFunction(torch.autograd.Function):
    """y = x Wᵀ with the forward, dgrad and wgrad GEMMs in block-scaled FP8 (see the module docstring).

    W arrives quantised in both layouts (`quantize_blocks_both_layouts`): the forward reads (w_q, w_scale),
    dgrad the transposed (w_t_q, w_t_scale). Gradients come back in the dtypes of x and of the master weight.
    """

    @staticmethod
    def forward(  # noqa: ANN205, PLR0913
        ctx,  # noqa: ANN001
        x: torch.Tensor,
        weight: torch.Tensor,
        block: int,
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        w_t_q: torch.Tensor,
        w_t_scale: torch.Tensor,
    ) -> torch.Tensor:
        need_grad_x, need_grad_w = ctx.needs_input_grad[:2]
        x2 = x.reshape(-1, x.shape[-1])
        if need_grad_w:  # wgrad reduces over tokens: keep x in FP8 with 128-token tiles, not x itself
            x_q, x_scale, x_t_q, x_t_scale = quantize_rows_and_columns(x2, block)
        else:
            x_q, x_scale = quantize_blocks(x2, (1, block))
            x_t_q = x_t_scale = None
        if not need_grad_x:
            w_t_q = w_t_scale = None
        y = fp8_block_matmul(x_q, x_scale, w_q, w_scale, _compute_dtype(x), block)
        ctx.save_for_backward(x_t_q, x_t_scale, w_t_q, w_t_scale)
        ctx.block, ctx.in_features = block, x.shape[-1]
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x_t_q, x_t_scale, w_t_q, w_t_scale = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        need_grad_x, need_grad_w = ctx.needs_input_grad[:2]
        grad_x = grad_w = None
        if need_grad_x and need_grad_w:
            dy_q, dy_scale, dy_t_q, dy_t_scale = quantize_rows_and_columns(dy, ctx.block)
        elif need_grad_x:
            dy_q, dy_scale = quantize_blocks(dy, (1, ctx.block))
        elif need_grad_w:
            dy_t_q, dy_t_scale = quantize_blocks(dy, (ctx.block, 1), transpose=True)
        if need_grad_x:
            grad_x = fp8_block_matmul(dy_q, dy_scale, w_t_q, w_t_scale, ctx.x_dtype, ctx.block)
            grad_x = grad_x.view(*grad_out.shape[:-1], ctx.in_features)
        if need_grad_w:
            grad_w = fp8_block_matmul(dy_t_q, dy_t_scale, x_t_q, x_t_scale, ctx.weight_dtype, ctx.block)
        return grad_x, grad_w, None, None, None, None, None


# Master weights change in the optimiser's step. Fused and foreach AdamW update them in place without bumping their
# version counters, so the quantised-weight cache of FP8Linear is keyed on this count of optimiser steps (taken
# by a global step hook, registered with the first FP8Linear) as well as on the weight's version (in-place edits
# such as load_state_dict) and storage.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK: list = []


def _count_optimizer_step(*args: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _watch_optimizer_steps() -> None:
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_step))


class FP8Linear(nn.Module):
    """A linear layer whose GEMMs run in block-scaled FP8 with float32 accumulation.

    `dtype=torch.float8_e4m3fn`: inference on a V3 checkpoint — `weight` (e4m3, frozen) and `weight_scale_inv`
    are loaded as stored. Any other dtype (bf16, fp32): training — `weight` is the master copy and is
    quantised on the fly in every forward. Either kind loads either checkpoint format (see
    `_load_from_state_dict`); `fp8_state_dict` writes the FP8 format.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: tuple[int, int] = (128, 128),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if block_size[0] != block_size[1]:
            # Square blocks let dgrad reuse the forward's quantised weight, transposed (V3 uses 128×128).
            raise ValueError(f"block_size must be square, got {block_size}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = tuple(block_size)
        _watch_optimizer_steps()
        dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device),
            requires_grad=dtype != FP8_DTYPE,
        )
        if self.is_fp8_storage:
            scale_shape = (math.ceil(out_features / block_size[0]), math.ceil(in_features / block_size[1]))
            self.register_buffer(
                "weight_scale_inv", torch.ones(scale_shape, dtype=torch.float32, device=device)
            )
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        bias_dtype = torch.get_default_dtype() if self.is_fp8_storage else dtype
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def is_fp8_storage(self) -> bool:
        return self.weight.dtype == FP8_DTYPE

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: tuple[int, int] = (128, 128)) -> "FP8Linear":
        """Wrap an nn.Linear; its weight (and bias) Parameters become the master weights, shared, not copied."""
        layer = cls(
            linear.in_features, linear.out_features, False, block_size, dtype=torch.float32, device="meta"
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_fp8_storage:
            block = self.block_size[1]
            x_q, x_scale = quantize_blocks(x.reshape(-1, self.in_features), (1, block))
            y = fp8_block_matmul(x_q, x_scale, self.weight, self.weight_scale_inv, _compute_dtype(x), block)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = _FP8LinearFunction.apply(x, self.weight, self.block_size[0], *self._quantized_weight())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The master weight's 128×128 blocks in both layouts, quantised once between two optimiser steps (every
        micro-batch of a step and the reference/old-policy passes reuse them).

        Inside a compiled block the staleness check (Python state) cannot run: the layer reads the cache that the
        block's pre-hook refreshed eagerly just before (`refresh_quantized_weights_before`), or, in a graph
        compiled without that hook, quantises in the graph at every forward."""
        if torch.compiler.is_compiling():
            if self.__dict__.get("refreshed_before_compiled_calls", False):
                return self.__dict__["_weight_fp8"][1]
            return quantize_blocks_both_layouts(self.weight.detach(), self.block_size)
        return self.refresh_quantized_weight()

    def refresh_quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise the master weight again if it changed since the cached copy was made; return the copy."""
        weight = self.weight.detach()
        key = (_OPTIMIZER_STEPS[0], weight._version, weight.data_ptr(), weight.device, weight.dtype)
        cached = self.__dict__.get("_weight_fp8")
        if cached is None or cached[0] != key:
            cached = (key, quantize_blocks_both_layouts(weight, self.block_size))
            self.__dict__["_weight_fp8"] = cached  # not a buffer: never saved, never moved by .to()
        return cached[1]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # Convert between the two formats so that a bf16 checkpoint loads into FP8 storage and a V3 FP8
        # checkpoint (weight + weight_scale_inv) loads into master weights (fine-tuning a released model).
        weight_key, scale_key = prefix + "weight", prefix + "weight_scale_inv"
        weight = state_dict.get(weight_key)
        if weight is not None:
            if weight.dtype == FP8_DTYPE and not self.is_fp8_storage:
                if scale_key not in state_dict:
                    raise KeyError(f"{weight_key} is float8 but {scale_key} is missing from the checkpoint")
                master = dequantize_weight(weight, state_dict.pop(scale_key), self.block_size)
                state_dict[weight_key] = master.to(self.weight.dtype)
            elif weight.dtype != FP8_DTYPE and self.is_fp8_storage:
                state_dict[weight_key], state_dict[scale_key] = quantize_weight(weight, self.block_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable, recurse: bool = True) -> "FP8Linear":
        # Module.to(dtype) casts every floating tensor, e4m3 included: FP8 storage follows the device only.
        if not self.is_fp8_storage:
            return super()._apply(fn, recurse)
        weight, scale = self.weight.data, self.weight_scale_inv
        super()._apply(fn, recurse)
        self.weight.data = weight.to(self.weight.device)
        self.weight_scale_inv = scale.to(self.weight_scale_inv.device)
        return self

    def extra_repr(self) -> str:
        kind = "fp8 storage" if self.is_fp8_storage else f"master {self.weight.dtype}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, {kind}"
        )


def refresh_quantized_weights_before(block: nn.Module) -> int:
    """Before each call of `block` (a module whose forward is compiled), bring the quantised weights of the
    training FP8Linear layers inside it up to date, eagerly: its compiled graph then reads them, quantised once per
    optimiser step, instead of quantising every weight in every forward. Returns how many layers it serves."""
    layers = [m for m in block.modules() if isinstance(m, FP8Linear) and not m.is_fp8_storage]
    if layers:

        def refresh(module: nn.Module, args: tuple) -> None:
            for layer in layers:
                layer.refresh_quantized_weight()

        block.register_forward_pre_hook(refresh)
        for layer in layers:
            layer.__dict__["refreshed_before_compiled_calls"] = True
    return len(layers)


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """V3's choice: every nn.Linear in FP8 except the output head and the MoE router (`...mlp.gate`);
    embeddings and norms are not nn.Linear, named ones are skipped anyway."""
    leaf = name.rsplit(".", 1)[-1]
    return (
        isinstance(module, nn.Linear)
        and leaf not in {"lm_head", "gate"}
        and "embed" not in leaf
        and "norm" not in leaf
    )


def convert_to_fp8(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] = default_fp8_filter,
    block_size: tuple[int, int] = (128, 128),
) -> list[str]:
    """Replace the nn.Linear modules that `filter_fn(qualified_name, module)` selects by FP8Linear, in place,
    keeping their Parameters as master weights. Returns the converted names."""
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and filter_fn(name, child):
                setattr(parent, child_name, FP8Linear.from_linear(child, block_size))
                converted.append(name)
    return converted


def fp8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every FP8Linear weight in V3's checkpoint format under HF names:
    `<name>.weight` (e4m3) and `<name>.weight_scale_inv` (float32 per block); everything else as is."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear) and not module.is_fp8_storage:
            prefix = f"{name}." if name else ""
            q, scale = quantize_weight(module.weight.detach(), module.block_size)
            state[prefix + "weight"], state[prefix + "weight_scale_inv"] = q, scale
    return state


def dequantize_state_dict(
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] = (128, 128),
) -> dict[str, torch.Tensor]:
    """Turn every `<name>.weight` (e4m3) + `<name>.weight_scale_inv` pair into a plain `dtype` weight, for
    loading a V3 FP8 checkpoint into modules that are not FP8Linear (e.g. grouped expert weights)."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale_key = key + "_scale_inv"
        if tensor.dtype == FP8_DTYPE:
            if scale_key not in state:
                raise KeyError(f"{key} is float8 but {scale_key} is missing")
            tensor = dequantize_weight(tensor, state[scale_key], block_size).to(dtype)
        out[key] = tensor
    return out
