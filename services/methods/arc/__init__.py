"""ARC adapters (config torch-free here; the module in `model.py`)."""

from services.methods.arc.config import ArcConfig as Config

__all__ = ["Config"]
