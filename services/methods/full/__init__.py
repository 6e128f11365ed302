"""Full fine-tuning baseline (config torch-free here; the module in `model.py`)."""

from services.methods.full.config import FullConfig as Config

__all__ = ["Config"]
