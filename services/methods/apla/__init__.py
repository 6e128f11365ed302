"""APLA: a random subset of the attention output projection's rows is trained (config torch-free here; the
module in `model.py`)."""

from services.methods.apla.config import AplaConfig as Config

__all__ = ["Config"]
