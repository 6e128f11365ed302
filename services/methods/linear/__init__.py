"""Linear probe (config torch-free here; the module in `model.py`)."""

from services.methods.linear.config import LinearConfig as Config

__all__ = ["Config"]
