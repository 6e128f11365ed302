"""LoSA side network (config torch-free here; the module in `model.py`)."""

from services.methods.losa.config import LosaConfig as Config

__all__ = ["Config"]
