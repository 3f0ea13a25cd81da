"""Optional reduced precision on CPU: dynamic int8 for the GPT's matrix multiplications.

On CPU the XTTS GPT is memory-bound (~1.5 GB of fp32 weights read per audio token); int8 weights read
four times fewer bytes. Only the GPT-2 transformer blocks are quantized: the
conditioning encoder and HiFi-GAN stay fp32. Off by default: the speed gain is measured by the
benchmark (`python -m bench`), but whether the voice still sounds the same can only be judged with the
real weights.

Uses `torch.ao.quantization.quantize_dynamic` (kept in torch 2.9; its successor is torchao's `quantize_`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _conv1d_to_linear(module: nn.Module) -> int:
    """Replace transformers' GPT-2 `Conv1D` (a Linear with a transposed weight) by `nn.Linear`, in place."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, Conv1D):
            in_features, out_features = child.weight.shape
            linear = nn.Linear(in_features, out_features, device=child.weight.device, dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                linear.bias.copy_(child.bias)
            setattr(module, name, linear)
            replaced += 1
        else:
            replaced += _conv1d_to_linear(child)
    return replaced


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize_gpt_int8` was applied to this XTTS model."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return any(isinstance(m, DynamicQuantizedLinear) for m in model.gpt.gpt.modules())


def quantize_gpt_int8(model: nn.Module) -> int:
    """Quantize the GPT-2 blocks of coqui's `Xtts` model to dynamic int8 (int8 weights, activations
    quantized per call), in place; returns the number of layers quantized. CPU only.

    The inference wrapper (`gpt.gpt_inference.transformer`) is the same module object, so it is
    quantized too; the token embeddings, the small audio-token head and HiFi-GAN stay fp32.
    """
    transformer = model.gpt.gpt
    if is_quantized(model):
        return 0
    _conv1d_to_linear(transformer)
    count = sum(isinstance(m, nn.Linear) for m in transformer.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(transformer, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return count
