"""Muon for the blocks' weight matrices, AdamW for everything else, stepped as one optimizer.

Muon (torch.optim.Muon) orthogonalises each matrix's momentum before the update, which trains the hidden
layers of small transformers in fewer steps than AdamW; it is made for 2-D hidden weights only, so the
embeddings, the output layer, the norms and the biases keep AdamW (as in the nanoGPT speedruns).
Lightning steps one optimizer per training step, so the two are wrapped in one: its `param_groups` are
theirs (a learning-rate scheduler scales both), and its state dict holds both states as plain data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated

import torch
from torch import nn

from shakespeare import internals
from shakespeare.ranges import ABOVE_0, AT_LEAST_0, AT_LEAST_1, Range

BFLOAT16_NEWTON_SCHULZ = internals.torch_newton_schulz()


def newton_schulz(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation, in float32 on CPUs: its bfloat16 matmuls are 15-20x slower than
    float32 ones on CPUs without AMX (measured on a 2-core AVX-512 machine), which made a Muon step cost
    more than the model's. Other devices keep torch's bfloat16 iteration."""
    if grad.device.type != "cpu":
        return BFLOAT16_NEWTON_SCHULZ(grad, ns_coefficients, ns_steps, eps)
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def is_hidden_matrix(name: str, parameter: nn.Parameter) -> bool:
    """A 2-D weight inside the residual blocks (attention and feed-forward), the weights Muon is made for."""
    return parameter.ndim == 2 and name.split(".")[0] == "blocks"


class MuonAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` (lr, momentum, weight_decay, ...) on the blocks' matrices; `torch.optim.AdamW`
    with the `adamw` settings on every other parameter.

    `params` are a model's `named_parameters()`, so the split is by name; plain parameters (no names)
    all go to AdamW.
    """

    def __init__(
        self,
        params: Iterable[tuple[str, nn.Parameter] | nn.Parameter],
        lr: Annotated[float, ABOVE_0] = 0.02,
        momentum: Annotated[float, Range(0, 1, high_open=True)] = 0.95,
        weight_decay: Annotated[float, AT_LEAST_0] = 0.0,
        nesterov: bool = True,
        ns_steps: Annotated[int, AT_LEAST_1] = 5,
        adjust_lr_fn: str | None = None,
        adamw: dict | None = None,
    ):
        named = [p if isinstance(p, tuple) else ("", p) for p in params]
        matrices = [p for name, p in named if is_hidden_matrix(name, p)]
        rest = [p for name, p in named if not is_hidden_matrix(name, p)]
        self.parts: dict[str, torch.optim.Optimizer] = {}
        if matrices:
            self.parts["muon"] = torch.optim.Muon(
                matrices,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            )
        if rest:
            self.parts["adamw"] = torch.optim.AdamW(rest, **dict(adamw or {}))
        groups = [group for part in self.parts.values() for group in part.param_groups]
        super().__init__(groups, defaults={})  # the parts' own group dicts: a scheduler's lr reaches them

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with internals.newton_schulz(newton_schulz):
            for part in self.parts.values():
                part.step()
        return loss

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state_dict[name])
        self.param_groups = [group for part in self.parts.values() for group in part.param_groups]

    def __repr__(self) -> str:
        return "\n".join(f"{name}: {part!r}" for name, part in self.parts.items())
