"""SGD with momentum and AdamW over parameters stacked along a leading configuration axis [K, ...], with a learning
rate and a weight decay per configuration.

torch.optim takes one lr per parameter group, so K configurations as K groups would hold K separate tensors per
parameter: K times the per-tensor work of every step (on a CPU, foreach kernels are loops over tensors). Here each
update is the one torch.optim makes, computed for all K at once with per-configuration factors broadcast over the
leading axis; tests/services/training/test_sweeps.py checks it against torch.optim.SGD and AdamW slice by slice.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from services.training.runs import RunsState


class StackedOptimizer:
    def __init__(
        self,
        params: dict[str, torch.Tensor],
        decayed: set[str],
        kind: str,
        lrs: list[float],
        weight_decays: list[float],
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.decayed, self.kind = params, decayed, kind
        ref = next(iter(params.values()))
        self.lr = torch.tensor(lrs, dtype=torch.float32, device=ref.device)
        self.wd = torch.tensor(weight_decays, dtype=torch.float32, device=ref.device)
        self.momentum, self.betas, self.eps = momentum, betas, eps
        self.steps = 0
        self.buffers: dict[str, torch.Tensor] = {}  # sgd: momentum; adamw: exp_avg and exp_avg_sq ("name.sq")

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @staticmethod
    def _per_config(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *[1] * (like.ndim - 1))

    @torch.no_grad()
    def step(self, lr_scale: float) -> None:
        # per-configuration factors [K] once per step, then per parameter only operations over its [K, ...] values
        self.steps += 1
        lr = self.lr * lr_scale
        b1, b2 = self.betas
        if self.kind == "sgd":
            neg_lr = -lr
        else:
            decay, step_size = 1 - lr * self.wd, lr / -(1 - b1**self.steps)
            bc2_sqrt = math.sqrt(1 - b2**self.steps)
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            decayed = name in self.decayed
            if self.kind == "sgd":  # torch.optim.SGD, dampening 0: buf = m buf + (g + wd p); p -= lr buf
                d = torch.addcmul(g, p, self._per_config(self.wd, p)) if decayed else g
                buf = self.buffers.get(name)
                if buf is None:
                    self.buffers[name] = buf = d.clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                p.addcmul_(buf, self._per_config(neg_lr, p))
                continue
            # torch.optim.AdamW: p *= 1 - lr wd; then p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
            if decayed:
                p.mul_(self._per_config(decay, p))
            if name not in self.buffers:
                self.buffers[name], self.buffers[f"{name}.sq"] = torch.zeros_like(p), torch.zeros_like(p)
            m, v = self.buffers[name], self.buffers[f"{name}.sq"]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)
            p.addcdiv_(m * self._per_config(step_size, p), denom)

    def keep(self, params: dict[str, torch.Tensor], ks: torch.Tensor) -> None:
        """Go on with configurations `ks` only (early termination): `params` are their stacked weights, sliced."""
        self.params = params
        self.lr, self.wd = self.lr[ks], self.wd[ks]
        self.buffers = {name: buf[ks].clone() for name, buf in self.buffers.items()}

    def state(self) -> tuple[dict[str, np.ndarray], RunsState]:
        return {k: v.detach().cpu().numpy() for k, v in self.buffers.items()}, {"steps": self.steps}

    def restore(self, tensors: dict[str, np.ndarray], info: RunsState) -> None:
        device = self.lr.device
        self.buffers = {k: torch.from_numpy(np.array(v)).to(device) for k, v in tensors.items()}
        self.steps = info["steps"]
