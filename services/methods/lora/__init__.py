"""LoRA through `peft` (config torch-free here; the module in `model.py`)."""

from services.methods.lora.config import LoraMethodConfig as Config

__all__ = ["Config"]
