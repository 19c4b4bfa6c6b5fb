"""The frozen teacher of a distillation job, as `training.teacher_precision` and `offload_teacher` say.

- Precision: the teacher is loaded in `teacher_precision` and computes in it. Its forward
  runs outside the student's autocast (which would otherwise turn an fp32 or fp16 teacher's
  matmuls into bf16), so the setting changes the teacher's numerics, not only its memory.
- Offloading: the weights stay in host memory and are streamed to the GPU one unit at a
  time (each decoder layer, and the embedding, final norm and LM head on their own): a
  forward pre-hook moves a unit to the device just before it runs, a forward hook moves it
  back right after. At most one unit's weights are on the GPU at once, the one-layer
  teacher term of the memory pre-flight (kubetune.planning.memory.estimate). Buffers (rotary
  tables) are small and stay on the device.
- Not offloaded: every rank holds the whole teacher on its device (it is not sharded),
  which is the pre-flight's T·p teacher term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules streamed one at a time: the decoder layers, then every other module that owns parameters."""
    layer_lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    layers = max(layer_lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=nn.ModuleList())
    inside = {id(sub) for layer in layers for sub in layer.modules()}
    others = [m for m in model.modules() if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    return [*layers, *others]


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class LayerStreamer:
    """Keeps `model`'s weights on `home` and moves each unit to `device` only while it runs."""

    def __init__(self, model: nn.Module, device: torch.device, home: torch.device | None = None) -> None:
        self.device, self.home = device, home or torch.device("cpu")
        model.to(self.home)
        for module in model.modules():  # buffers (rotary inv_freq) live on the device
            for name, buffer in module.named_buffers(recurse=False):
                module._buffers[name] = buffer.to(device)
        self.units = _units(model)
        self.resident: set[int] = set()
        self.resident_bytes = 0
        self.peak_bytes = 0
        """Most parameter bytes on the device at once (measured while streaming)."""
        self.peak_units = 0
        self.handles = [
            handle
            for unit in self.units
            for handle in (
                unit.register_forward_pre_hook(self._arrive),
                unit.register_forward_hook(self._leave),
            )
        ]

    def _arrive(self, unit: nn.Module, _args: Any) -> None:
        unit.to(self.device)
        if id(unit) not in self.resident:
            self.resident.add(id(unit))
            self.resident_bytes += _parameter_bytes(unit)
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        self.peak_units = max(self.peak_units, len(self.resident))

    def _leave(self, unit: nn.Module, _args: Any, _output: Any) -> None:
        unit.to(self.home)
        if id(unit) in self.resident:
            self.resident.discard(id(unit))
            self.resident_bytes -= _parameter_bytes(unit)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class FrozenTeacher:
    """Teacher logits in the teacher's own dtype, with the weights on the device or streamed."""

    def __init__(self, model: nn.Module, device: torch.device, offload: bool) -> None:
        model.requires_grad_(False)
        model.eval()
        self.model, self.device = model, device
        self.dtype = next(model.parameters()).dtype
        self.streamer = LayerStreamer(model, device) if offload else None
        if self.streamer is None:
            model.to(device)

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        # Outside any autocast of the student: the teacher computes in teacher_precision.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            logits: torch.Tensor = self.model(**inputs).logits
        return logits
