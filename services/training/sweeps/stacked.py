"""Side-network configurations of one architecture (linear probes, LoSA networks that differ only in lr and weight
decay) trained as one set of tensors: each parameter is stacked over the configurations, [K, ...], and the module's
forward runs for all K at once on a mini-batch that every configuration shares: the method's own
`forward_stacked(params, x)` where it has one (linear: K heads as one matrix product; losa: batched matrix products
per side layer), else `torch.vmap` over `torch.func.functional_call` with the stacked parameters. One optimizer step
updates all K (sweeps/optim.py).

`make_runs` groups a sweep's configurations: one `StackedRuns` per side architecture with several configurations,
a plain `ModuleRuns` (services/training/runs.py) for any other configuration, adapted backbones included.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from services.methods import MethodConfig
from services.spec import Hyperparameters
from services.training.objectives import Objective
from services.training.runs import ModuleRuns, Runs, RunsState, autocast, decayed_names
from services.training.sweeps.optim import StackedOptimizer


class StackedRuns:
    def __init__(self, models: list[nn.Module], hps: list[Hyperparameters], objective: Objective, device: str) -> None:
        template = models[0]
        self.template, self.count, self.objective, self.device = template, len(models), objective, device
        self.input_layers = template.input_layers
        names = [n for n, p in template.named_parameters() if p.requires_grad]
        self.params = {
            n: torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_(True) for n in names
        }
        # the frozen norms of the readout and any frozen parameter: the same in every configuration
        self.fixed = {
            **dict(template.named_buffers()),
            **{n: p.detach() for n, p in template.named_parameters() if not p.requires_grad},
        }
        self.base_lrs = [h.lr for h in hps]
        self.clip = hps[0].clip_grad_norm  # a training setting that sweeps do not vary
        self.opt = StackedOptimizer(
            self.params,
            decayed_names(template),
            hps[0].optimizer,
            [h.lr for h in hps],
            [h.weight_decay for h in hps],
        )
        own = getattr(template, "forward_stacked", None)
        self._forward = own if own is not None else torch.vmap(self._one, in_dims=(0, None))

    def _one(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, self.fixed), (x,))

    def train(self, mode: bool) -> None:
        self.template.train(mode)

    def keep(self, ks: list[int]) -> None:
        """Go on training configurations `ks` only (services/training/halving.py stopped the others): their weights,
        optimizer state and learning rates, so that every later step computes len(ks) configurations, not K."""
        idx = torch.tensor(ks, device=next(iter(self.params.values())).device)
        self.params = {n: p.detach()[idx].clone().requires_grad_(True) for n, p in self.params.items()}
        self.opt.keep(self.params, idx)
        self.base_lrs = [self.base_lrs[k] for k in ks]
        self.count = len(ks)

    def _parts(self, n: int) -> list[slice]:
        """The batch's rows in micro-batches. K networks that each compute their own activations (LoSA) hold K times
        one network's: on the CPU, where that spills the caches and every step faults fresh pages in, they run on
        about 2 B / K rows at a time (8 LoSA networks at batch 64: 17% faster steps, 40% faster evaluation). On a
        GPU one launch for the whole batch is faster."""
        if not (self.template.own_activations and self.device == "cpu" and self.count > 2):
            return [slice(0, n)]
        rows = max(1, -(-2 * n // self.count))
        return [slice(s, s + rows) for s in range(0, n, rows)]

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> torch.Tensor:
        self.opt.zero_grad()
        parts = self._parts(len(y))
        total = self.objective.normalizer(y) if len(parts) > 1 else None
        losses = []
        for part in parts:  # gradients of micro-batches add up to the batch's: each weighted by its share of it
            with autocast(self.device):
                loss = self.objective(self._forward(self.params, x[part]), y[part])
            if total is not None:
                loss = loss * (self.objective.normalizer(y[part]) / total)
            loss.sum().backward()
            losses.append(loss.detach())
        if self.clip:
            self._clip(self.clip)
        self.opt.step(lr_scale)
        return torch.stack(losses).sum(0)

    @torch.no_grad()
    def _clip(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ for each configuration's own gradient."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.float().pow(2).reshape(len(g), -1).sum(1) for g in grads]).sum(0).sqrt()  # [K]
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return torch.cat([self._forward(self.params, x[part]).float() for part in self._parts(len(x))], dim=1)

    def states(self) -> dict[str, np.ndarray]:
        """The state dict each configuration's own module would save, stacked [K, ...] (frozen buffers repeated)."""
        out = {}
        for name, value in self.template.state_dict().items():
            stacked = self.params[name] if name in self.params else value.expand(self.count, *value.shape)
            out[name] = stacked.detach().cpu().numpy()
        return out

    def checkpoint(self) -> tuple[dict[str, np.ndarray], RunsState]:
        tensors = {f"param.{n}": p.detach().cpu().numpy() for n, p in self.params.items()}
        opt_tensors, info = self.opt.state()
        return tensors | {f"opt.{k}": v for k, v in opt_tensors.items()}, info

    def restore(self, tensors: dict[str, np.ndarray], info: RunsState) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.array(tensors[f"param.{name}"])))
        self.opt.restore({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, info)


def make_runs(
    models: list[nn.Module],
    methods: list[MethodConfig],
    hps: list[Hyperparameters],
    objective: Objective,
    device: str,
    stack: bool = True,
) -> tuple[list[Runs], list[tuple[int, int]]]:
    """The Runs that train `models` (configuration j: `models[j]`, its method config `methods[j]` and settings
    `hps[j]`), and where configuration j is: (index into the runs, index k within it). Side networks of the same
    method config (one architecture) are stacked when there are several and `stack`; others run on their own."""
    groups: dict[str, list[int]] = {}
    for j, (model, method) in enumerate(zip(models, methods, strict=True)):
        side = hasattr(model, "readout")  # a readout.Classifier, fed activations
        key = json.dumps(method.model_dump(), sort_keys=True) if side and stack else f"own:{j}"
        groups.setdefault(key, []).append(j)
    runs: list[Runs] = []
    where: list[tuple[int, int]] = [(0, 0)] * len(models)
    for members in groups.values():
        if len(members) == 1:
            j = members[0]
            runs.append(ModuleRuns(models[j], hps[j], objective, device))
        else:
            runs.append(StackedRuns([models[j] for j in members], [hps[j] for j in members], objective, device))
        for k, j in enumerate(members):
            where[j] = (len(runs) - 1, k)
    return runs, where
