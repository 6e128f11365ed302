"""The device memory of a method trained through the backbone (APLA, ARC, LoRA, full fine-tuning in modes `images`
and `tail`), for the planner: an estimate (services/architectures.py: backprop_bytes), checked against the device's
memory when SIDETUNE_DEVICE_MEMORY_GB says what it is, with the changes that would make it fit. Video clips make
this large: a ViViT-B of 16 frames runs 1,569 tokens per clip against an image's 197. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.architectures import Architecture, backprop_bytes
from services.modality import modality_for
from services.spec import JobSpec

GB = 10**9


@dataclass(frozen=True)
class BackpropMemory:
    need: int  # bytes, estimated
    fits: bool | None  # None: the device's memory is not known
    limit: int | None = None
    reason: str = ""  # what backpropagates through what
    remedies: list[str] = field(default_factory=list)


def backprop_memory(spec: JobSpec, arch: Architecture | None, device_memory_gb: float | None) -> BackpropMemory | None:
    """The estimate for `spec`, None for a method that never backpropagates through the backbone (or no shape)."""
    if arch is None or spec.mode not in ("images", "tail"):
        return None
    blocks = spec.execution.tail_blocks if spec.mode == "tail" else arch.num_layers
    batch, full = spec.training.batch_size, spec.method.name == "full"
    need = backprop_bytes(arch, blocks, batch, every_weight=full)
    if device_memory_gb is None:
        return BackpropMemory(need, None)
    limit = int(device_memory_gb * GB)
    if need <= limit:
        return BackpropMemory(need, True, limit)
    fixed = backprop_bytes(arch, blocks, 0, every_weight=full)
    per_item = backprop_bytes(arch, blocks, 1, every_weight=full) - fixed
    fit = (limit - fixed) // per_item
    remedies = [f"training.batch_size {fit}"] if fit >= 1 else []
    if spec.mode == "images" and "tail" in type(spec.method).modes:
        remedies.append(
            'execution.mode "tail" (only the last execution.tail_blocks blocks are trained, from the cache)'
        )
    modality = modality_for(spec.backbone)
    remedies.extend(modality.smaller_items)
    remedies.append("a method that never backpropagates through the backbone (losa, linear)")
    reason = (
        f"{spec.method.name} in mode {spec.mode} backpropagates through {blocks} blocks"
        f"{modality.per_item(arch.tokens)} at batch size {batch}"
    )
    return BackpropMemory(need, False, limit, reason, remedies)
