"""torch.optim's AdamW, Adam and SGD-with-momentum arithmetic, written out for the heads.

Why not torch.optim itself: its `step` imports torch._dynamo (1.1 s of CPU, ~1,700 modules), and
every sweep trial that fits a head is a fresh process; for a probe on cached features that is more
than the whole fit. These follow torch 2.x's single-tensor path with its defaults otherwise (no
amsgrad, no nesterov, no dampening, no maximize), so on CPU they give the same tensors as
torch.optim bit for bit after every step (tests/test_protocols.py). On CUDA torch.optim would take
its multi-tensor (foreach) path, which may differ from these in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

SGD_MOMENTUM = 0.9


def adamw_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, *, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One AdamW update of `p` in place (`m`, `v`: its moment buffers; `step` counts from 1).
    With weight_decay 0 it is torch.optim.Adam's update (p * 1.0 is exact)."""
    b1, b2 = betas
    with torch.no_grad():
        p.mul_(1 - lr * weight_decay)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / (1 - b2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))


def adamw_step(params: tuple[torch.Tensor, ...], state: list[list[torch.Tensor]], step: int, *, lr: float,
               weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One torch.optim.AdamW step of tensors that all have gradients; `state` is [exp_avgs,
    exp_avg_sqs], filled on the first step."""
    if not state[0]:
        state[0][:] = [torch.zeros_like(p) for p in params]
        state[1][:] = [torch.zeros_like(p) for p in params]
    for p, m, v in zip(params, state[0], state[1], strict=True):
        adamw_update(p, p.grad, m, v, step, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def sgd_step(params: tuple[torch.Tensor, ...], state: list[list[torch.Tensor]], step: int, *, lr: float,
             weight_decay: float, momentum: float = SGD_MOMENTUM) -> None:
    """One torch.optim.SGD step with momentum (coupled weight decay); `state[0]`: the buffers."""
    with torch.no_grad():
        grads = [p.grad.add(p, alpha=weight_decay) if weight_decay else p.grad for p in params]
        if not state[0]:
            state[0][:] = [torch.clone(g).detach() for g in grads]
        else:
            for buf, g in zip(state[0], grads, strict=True):
                buf.mul_(momentum).add_(g)
        for p, buf in zip(params, state[0], strict=True):
            p.add_(buf, alpha=-lr)


class AdamW:
    """The part of torch.optim.AdamW's interface the heads use: `step()`, `zero_grad()`, a
    settable `lr` (a schedule sets it before each step). As torch.optim, a parameter without a
    gradient is skipped and keeps its own step count."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, eps
        self.state: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if i not in self.state:
                self.state[i] = ([0], torch.zeros_like(p), torch.zeros_like(p))
            count, m, v = self.state[i]
            count[0] += 1
            adamw_update(p, p.grad, m, v, count[0], lr=self.lr, weight_decay=self.weight_decay,
                         betas=self.betas, eps=self.eps)


class Adam(AdamW):
    """torch.optim.Adam without weight decay (the only way the heads use it)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, lr, weight_decay=0.0, betas=betas, eps=eps)
