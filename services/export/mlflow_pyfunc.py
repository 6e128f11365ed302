"""The code of a `format=mlflow` export: an MLflow "model from code" (mlflow_model.py copies this file into the
export, where MLflow runs it to load the model). It needs torch, timm (with safetensors and Pillow), pandas and mlflow,
never sidetune: it imports nothing of this repository, and it is tested in a Python where sidetune cannot be imported.

The model is the timm checkpoint the `timm` export carries (artifact `timm`: `model.safetensors`, timm's
`config.json` with the preprocessing and `label_names`, and `sidetune.json`), built by `timm.create_model("local-dir:")`
at the image size it was trained at.

Input: a DataFrame with one column `image`, each row an image file (PNG, JPEG, ...) as a base64 string, the form that
travels in JSON (`mlflow models serve`: `{"dataframe_split": {"columns": ["image"], "data": [["iVBORw0..."]]}}`).
Decoded as sidetune's predict decodes (EXIF orientation applied, transparency on white, RGB), then timm's eval
transform of the data config. Output: a DataFrame with a float64 column per class, named by the class, in the model's
class order: the softmax (a multi-label model: a sigmoid per tag), the scores predict answers.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import timm
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)  # what transparent pixels are composited on, as sidetune's decoding does
TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def decode(data: str) -> Image.Image:
    """A base64-encoded image file -> an upright RGB image."""
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in TRANSPARENT or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
        return im.convert("RGB")


class SidetuneClassifier(mlflow.pyfunc.PythonModel):
    """Images (base64) -> class probabilities, by the timm model of artifact `timm`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts["timm"])
        config = json.loads((folder / "config.json").read_text())
        self.classes: list[str] = config["label_names"]
        self.multi_label = bool(json.loads((folder / "sidetune.json").read_text())["multi_label"])
        self.model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        data_config = timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"])
        self.transform = timm.data.create_transform(**data_config)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        images = model_input["image"]
        x = torch.stack([self.transform(decode(data)) for data in images])
        with torch.inference_mode():
            logits = self.model(x)
        scores = logits.sigmoid() if self.multi_label else logits.softmax(-1)
        return pd.DataFrame(scores.double().numpy(), columns=self.classes)


mlflow.models.set_model(SidetuneClassifier())
