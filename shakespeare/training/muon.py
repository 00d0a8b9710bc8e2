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


def newton_schulz(
    grads: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of each matrix of a stack (N, rows, columns) at once: a batch of matrix
    products per iteration instead of N small ones. In float32 on CPUs, whose bfloat16 matmuls are 15-20x slower
    than float32 ones without AMX (measured on a 2-core AVX-512 machine); in bfloat16, as torch's, elsewhere."""
    a, b, c = ns_coefficients
    tall = grads.size(-2) > grads.size(-1)
    x = grads.to(torch.float32 if grads.device.type == "cpu" else torch.bfloat16)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalised(updates: list[torch.Tensor], ns_coefficients, ns_steps: int, eps: float) -> list[torch.Tensor]:
    """Each update orthogonalised, the matrices of one shape (every block's feed-forward weights, say) as one stack."""
    by_shape: dict[tuple, list[int]] = {}
    for i, update in enumerate(updates):
        by_shape.setdefault((tuple(update.shape), update.dtype, update.device), []).append(i)
    found: list[torch.Tensor | None] = [None] * len(updates)
    for indices in by_shape.values():
        stack = newton_schulz(torch.stack([updates[i] for i in indices]), ns_coefficients, ns_steps, eps)
        for i, update in zip(indices, stack.unbind()):
            found[i] = update
    return found


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon (the same settings, update and state: `momentum_buffer`), with the Newton-Schulz iterations
    of same-shaped matrices run as one batch: on a CPU they took a fifth of a small model's step one by one."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer)
            steps = orthogonalised(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for p, update in zip(params, steps):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-internals.muon_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def is_hidden_matrix(name: str, parameter: nn.Parameter) -> bool:
    """A 2-D weight inside the residual blocks (attention and feed-forward), the weights Muon is made for."""
    return parameter.ndim == 2 and name.split(".")[0] == "blocks"


class MuonAdamW(torch.optim.Optimizer):
    """Muon (`torch.optim.Muon`'s settings: lr, momentum, weight_decay, ...) on the blocks' matrices; `torch.optim.AdamW`
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
            self.parts["muon"] = BatchedMuon(
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
