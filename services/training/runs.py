"""What the training loop (services/training/fit.py: `fit`) trains: `Runs`, a set of K configurations that see the same
mini-batches. A plain job is one `ModuleRuns` (a module and its torch optimizer); a sweep is several: one
`ModuleRuns` per configuration that trains through the backbone, and one `StackedRuns`
(services/training/sweeps/stacked.py) per side-network architecture, whose configurations are computed together.

Every Runs applies the same rules: no weight decay on biases, 1-D parameters (norms, scales) and the tokens and
position embeddings a timm model lists in `no_weight_decay()` (timm's `param_groups_weight_decay` rule, as DeiT, MAE
and APLA's official code train); the gradient's global norm clipped per configuration when `clip_grad_norm` is set;
the learning rate of step s is the configuration's peak lr times the schedule's factor for s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypedDict

import numpy as np
import torch
from torch import nn

from services.training.objectives import Objective

if TYPE_CHECKING:
    from services.spec import Hyperparameters


def warm_up() -> None:
    """Pay once, at a worker's start, what the first torch optimizer of a process costs: its constructor imports
    torch's compiler stack (1.4 s here), which the first job would otherwise count as training time (a linear probe's
    whole L-BFGS path takes 0.14 s)."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def autocast(device: str):
    # bfloat16 autocast on a GPU (no loss scaling needed); full precision on the CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def decayed_names(model: nn.Module) -> set[str]:
    """Names of the trainable parameters that get weight decay: matrices, not biases or 1-D parameters, nor what a
    module's `no_weight_decay()` names (timm ViTs: pos_embed, cls_token, reg_token, dist_token)."""
    exempt: set[str] = set()
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            exempt |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.ndim > 1 and not name.endswith(".bias") and name not in exempt
    }


class RunsState(TypedDict, total=False):
    """What a Runs checkpoints beside its tensors (JSON, in the checkpoint's metadata): a ModuleRuns its torch
    optimizer's parameter groups (each option's value by name, the parameters' ids under `params`) and the scalars of
    its per-parameter state (by parameter id, as JSON keys are strings); a StackedRuns its optimizer's step count."""

    param_groups: list[dict[str, float | bool | None | list[int] | list[float] | tuple[float, float]]]
    opt_scalars: dict[str, dict[str, float]]
    steps: int


class Runs(Protocol):
    count: int  # configurations
    input_layers: list[int] | None  # the cached layers they read (None: images)
    base_lrs: list[float]  # each configuration's peak learning rate

    def train(self, mode: bool) -> None: ...
    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> torch.Tensor: ...  # losses [K], detached
    def logits(self, x: torch.Tensor) -> torch.Tensor: ...  # [K, B, C]
    # every configuration's weights, stacked [K, ...], as the artifact saves them; on the CPU these are views of the
    # live weights, which the next step changes: copy what you keep
    def states(self) -> dict[str, np.ndarray]: ...
    def checkpoint(self) -> tuple[dict[str, np.ndarray], RunsState]: ...
    def restore(self, tensors: dict[str, np.ndarray], info: RunsState) -> None: ...


class ModuleRuns:
    """One configuration: `model` (a side network or an adapted ViT) and a torch SGD (momentum 0.9) or AdamW."""

    count = 1

    def __init__(self, model: nn.Module, hp: Hyperparameters, objective: Objective, device: str) -> None:
        self.model, self.objective, self.device = model, objective, device
        self.input_layers = model.input_layers
        self.clip = hp.clip_grad_norm
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        decayed = decayed_names(model)
        groups = [
            {"params": [p for n, p in named if n in decayed], "weight_decay": hp.weight_decay},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        self.params = [p for _, p in named]
        if hp.optimizer == "sgd":
            self.opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        else:
            self.opt = torch.optim.AdamW(groups, lr=hp.lr)
        self.base_lr = hp.lr
        self.base_lrs = [hp.lr]
        # torch.compile (training.compile) shares the module's parameters: the state is still saved from `model`
        self.forward = torch.compile(model) if hp.compile else model

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> torch.Tensor:
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * lr_scale
        with autocast(self.device):
            loss = self.objective(self.forward(x)[None], y)
        self.opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        if self.clip:
            nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        return loss.detach()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            return self.forward(x)[None].float()

    def states(self) -> dict[str, np.ndarray]:
        return {k: v[None] for k, v in to_numpy(self.model.trainable_state()).items()}

    def checkpoint(self) -> tuple[dict[str, np.ndarray], RunsState]:
        tensors = {f"model.{k}": v for k, v in to_numpy(self.model.trainable_state()).items()}
        opt_state = self.opt.state_dict()
        for pid, s in opt_state["state"].items():
            for name, value in s.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{pid}.{name}"] = value.detach().cpu().numpy().reshape(value.shape)
        scalars = {
            str(pid): {k: v for k, v in s.items() if not torch.is_tensor(v)} for pid, s in opt_state["state"].items()
        }
        return tensors, {"param_groups": opt_state["param_groups"], "opt_scalars": scalars}

    def restore(self, tensors: dict[str, np.ndarray], info: RunsState) -> None:
        self.model.load_trainable(to_torch({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}))
        opt_state: dict[int, dict[str, float | torch.Tensor]] = {
            int(pid): dict(s) for pid, s in info["opt_scalars"].items()
        }
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = torch.from_numpy(np.array(v))
        self.opt.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
