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


class _Optimizer:
    """What the heads use of torch.optim's interface: `step()`, `zero_grad()` and a settable `lr`
    (a schedule sets it before each step). As torch.optim, a parameter without a gradient is
    skipped (and keeps its own step count)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float):
        self.params, self.lr = list(params), float(lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class AdamW(_Optimizer):
    """torch.optim.AdamW (decoupled weight decay)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr)
        self.weight_decay, self.betas, self.eps = float(weight_decay), betas, eps
        self.state: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = {}  # step count, m, v

    def step(self) -> None:
        b1, b2 = self.betas
        lr = self.lr
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                if i not in self.state:
                    self.state[i] = ([0], torch.zeros_like(p), torch.zeros_like(p))
                count, m, v = self.state[i]
                count[0] += 1
                t = count[0]
                p.mul_(1 - lr * self.weight_decay)  # with weight decay 0 this is Adam's update: p * 1.0 is exact
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(self.eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


class Adam(AdamW):
    """torch.optim.Adam without weight decay (the only way the heads use it)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, lr, weight_decay=0.0, betas=betas, eps=eps)


class SGD(_Optimizer):
    """torch.optim.SGD with momentum (coupled weight decay, no dampening, no nesterov): the linear
    probe's `optimizer: sgd`."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = SGD_MOMENTUM,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.buffers: dict[int, torch.Tensor] = {}

    def step(self) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
                if i not in self.buffers:  # the first step's buffer is the gradient itself
                    self.buffers[i] = torch.clone(g).detach()
                else:
                    self.buffers[i].mul_(self.momentum).add_(g)
                p.add_(self.buffers[i], alpha=-self.lr)
