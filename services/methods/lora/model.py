"""LoRA (Hu et al., ICLR 2022) on a timm ViT through `peft`: the targeted Linears of the adapted blocks become
peft `lora.Linear` layers in place, so the base class's forward (whole ViT, or the last blocks in tail mode) runs
through them; `merge()` folds B A into the base weights and puts the plain Linears back.
"""

from __future__ import annotations

import re

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from services.methods.adapted import AdaptedViT
from services.methods.lora.config import LoraMethodConfig
from services.spec import SpecError

# config target -> module path inside a timm ViT block
TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class Lora(AdaptedViT):
    def __init__(
        self, config: LoraMethodConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None
    ) -> None:
        super().__init__(vit, num_classes, tail_blocks)
        blocks = "|".join(str(i) for i in self.adapted_blocks)
        layers = "|".join(re.escape(TARGET_PATHS[t]) for t in config.targets)
        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            # a string is matched with re.fullmatch against module names relative to the ViT, so only
            # blocks.<i>.attn.qkv etc. of the adapted blocks match (never patch_embed.proj or the head)
            target_modules=rf"blocks\.({blocks})\.({layers})",
            bias="none",
        )
        inject_adapter_in_model(peft_config, self.vit)
        # peft freezes every parameter that is not LoRA's, the new classifier too
        self.head.requires_grad_(True)
        found = [name for name, m in self.vit.named_modules() if isinstance(m, LoraLayer)]
        expected = len(self.adapted_blocks) * len(config.targets)
        if len(found) != expected:
            raise SpecError(
                f"LoRA found {len(found)} of the {expected} Linear layers {sorted(config.targets)} it targets in "
                f"blocks {self.first_block}..{len(self.vit.blocks) - 1}: this backbone's blocks are not timm ViT blocks"
            )

    def merge(self) -> nn.Module:
        """Fold every B A into its base weight and put the plain Linear back, in place: the ViT that comes back
        (also `self.vit`) holds no peft module, and this model no longer has LoRA parameters."""
        for name, module in list(self.vit.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                self.vit.set_submodule(name, module.get_base_layer())
        if "peft_config" in self.vit.__dict__:  # left on the model by inject_adapter_in_model
            del self.vit.peft_config
        return self.vit


def build(config: LoraMethodConfig, vit: nn.Module, num_classes: int, tail_blocks: int | None = None) -> Lora:
    return Lora(config, vit, num_classes, tail_blocks)
