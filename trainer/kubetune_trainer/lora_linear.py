"""peft's LoRA linear layer with a leaner forward for the plain case.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: three matrix products, then a multiply
and an add over the full output, each a fresh tensor of the layer's output size (and a multiply
again in the backward). For a small model on CPU those element-wise passes and allocations
cost as much as the adapter's matrix products. Here the adapter's product, its scaling and the
add run as one in-place `addmm_` into the base output, so the only full-size tensor is the
output itself. Same parameters, names and saved adapter as peft's layer; the result equals
peft's to float rounding (tests/trainer/test_lora_linear.py).

The lean path runs only where it is exactly the plain LoRA: one active adapter, no dropout, no
variant (DoRA ...), not merged, plain (not sharded) tensors of one dtype and no autocast.
Anything else takes peft's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraConfig
from torch import nn


class AddmmLoraLinear(PeftLoraLinear):
    """A peft LoRA `Linear` whose plain forward is `x Wᵀ (+ b)` then `+= scaling · (x Aᵀ) Bᵀ` in place."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lean = self._lean_weights(x, args, kwargs)
        if lean is None:
            result: torch.Tensor = super().forward(x, *args, **kwargs)
            return result
        weight, bias, lora_a, lora_b, scaling = lean
        rows = x.reshape(-1, x.shape[-1])
        out = torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
        # In place: the base product's output is not saved for its backward, so autograd allows it.
        out.addmm_(torch.mm(rows, lora_a.t()), lora_b.t(), alpha=scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lean_weights(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float] | None:
        """(weight, bias, A, B, scaling) when the plain LoRA path applies, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        if not isinstance(self.lora_dropout[adapter], nn.Identity) or self.fan_in_fan_out:
            return None
        base = self.get_base_layer()
        if type(base) is not nn.Linear or torch.is_autocast_enabled(x.device.type):
            return None
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        assert isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor)
        tensors = [x, base.weight, lora_a, lora_b] + ([base.bias] if base.bias is not None else [])
        # DTensors (tensor parallel, FSDP2) and mixed dtypes keep peft's path.
        if any(type(t) not in (torch.Tensor, nn.Parameter) or t.dtype != x.dtype for t in tensors):
            return None
        return base.weight, base.bias, lora_a, lora_b, float(self.scaling[adapter])


def register_lean_linear(config: LoraConfig) -> LoraConfig:
    """Make peft build `AddmmLoraLinear` for every `nn.Linear` it adapts under this config."""
    config._register_custom_module({nn.Linear: AddmmLoraLinear})
    return config
