"""The lean LoRA layer computes what peft's computes: same outputs, gradients, training losses
and saved adapter; anything but the plain case goes through peft's own forward."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from kubetune_trainer.lora_linear import AddmmLoraLinear, register_lean_linear
from kubetune_trainer.models import add_lora, load_causal_lm


def _pair(bias: bool, dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    """(peft's LoRA layer, the lean one) over the same base weights and adapter weights."""
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias).requires_grad_(False)  # frozen, as under get_peft_model
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["layer"])
    peft_layer = PeftLoraLinear(copy.deepcopy(base), "default", config=config, r=4, lora_alpha=8)
    lean_layer = AddmmLoraLinear(copy.deepcopy(base), "default", config=config, r=4, lora_alpha=8)
    with torch.no_grad():  # B starts at zero: give it values so the adapter's product counts
        peft_layer.lora_B["default"].weight.normal_()
        lean_layer.load_state_dict(peft_layer.state_dict())
    return peft_layer, lean_layer


def _forward_backward(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    trainable = [p.grad for p in layer.parameters() if p.requires_grad]
    return out.detach(), [x.grad, *trainable]  # type: ignore[list-item]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
def test_lean_layer_matches_peft_outputs_and_gradients(bias: bool, shape: tuple[int, ...]) -> None:
    peft_layer, lean_layer = _pair(bias)
    x = torch.randn(shape)
    want, want_grads = _forward_backward(peft_layer, x)
    got, got_grads = _forward_backward(lean_layer, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads) == 3  # the input, A and B
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _spy_on_peft_forward(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = PeftLoraLinear.forward

    def counted(self: PeftLoraLinear, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(self, x, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(PeftLoraLinear, "forward", counted)
    return calls


@pytest.mark.parametrize(
    "case",
    ["plain", "dropout", "merged", "adapters disabled", "bf16 input", "autocast"],
)
def test_only_the_plain_case_takes_the_lean_path(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    peft_layer, lean_layer = _pair(bias=True, dropout=0.5 if case == "dropout" else 0.0)
    x = torch.randn(4, 24)
    if case == "merged":
        lean_layer.merge()
        peft_layer.merge()
    if case == "adapters disabled":
        lean_layer.enable_adapters(False)
        peft_layer.enable_adapters(False)
    if case == "bf16 input":
        x = x.bfloat16()
        lean_layer.to(torch.bfloat16)
        peft_layer.to(torch.bfloat16)
    lean_layer.eval()  # no dropout randomness: both sides must agree
    peft_layer.eval()
    calls = _spy_on_peft_forward(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = lean_layer(x)
        used_peft = bool(calls)
        want = peft_layer(x)
    assert used_peft == (case not in ("plain", "bf16 input"))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def _peft_default(model_dir: Path) -> nn.Module:
    model = load_causal_lm(str(model_dir), torch.float32)
    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[n for n in names if n != "lm_head"])
    return get_peft_model(model, config)


def test_a_model_trains_as_under_peft_and_saves_a_plain_peft_adapter(tiny_model: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    lean = add_lora(load_causal_lm(str(tiny_model), torch.float32), 4, 8, None)
    torch.manual_seed(0)
    plain = _peft_default(tiny_model)
    assert any(isinstance(m, AddmmLoraLinear) for m in lean.modules())
    assert not any(isinstance(m, AddmmLoraLinear) for m in plain.modules())
    ids = torch.randint(0, 100, (2, 12))
    losses: dict[str, list[float]] = {}
    for name, model in (("lean", lean), ("plain", plain)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses["lean"], losses["plain"], strict=True)) <= 1e-5, losses
    assert losses["lean"][-1] < losses["lean"][0]  # it did train

    lean.save_pretrained(tmp_path / "adapter")  # type: ignore[operator]
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(tiny_model), torch.float32), tmp_path / "adapter")
    assert not any(isinstance(m, AddmmLoraLinear) for m in reloaded.modules())  # plain peft reads it
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, lean(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_registering_keeps_the_config_serialisable() -> None:
    config = register_lean_linear(LoraConfig(r=4, target_modules=["q_proj"]))
    assert "AddmmLoraLinear" not in str(config.to_dict())
