"""The code of a `format=mlflow` export: an MLflow "model from code" (mlflow_model.py copies this file into the
export, where MLflow runs it to load the model). It needs onnxruntime, timm (for its eval transform; torch with it),
Pillow, pandas and mlflow, and PyAV for a video model, never sidetune: it imports nothing of this repository, and it
is tested in a Python where sidetune cannot be imported.

The model is the ONNX graph the `onnx` export writes (artifact `onnx`: `model.onnx`, its weights in
`model.onnx.data` beside it), run by onnxruntime: every method, video models included, and no pickle anywhere. The
graph's metadata says the rest: `classes`, `preprocessing` (timm's data config), `multi_label`, and `video` (the clip
sampling) for a video model.

Input: a DataFrame with one string column, each row a file as base64 (the form that travels in JSON, `mlflow models
serve`: `{"dataframe_split": {"columns": ["image"], "data": [["iVBORw0..."]]}}`): `image` (PNG, JPEG, ...) for an
image model, `video` (mp4, webm, ...) for a video model. Each is decoded as sidetune's predict decodes it: an image
upright (EXIF orientation), transparency on white, RGB; a video by PyAV, its clip the frames predict samples (segment
centres, or the centred window), each frame an RGB image. Then timm's eval transform of `preprocessing` (a clip's
frames stacked along the channels, frame-major). Output: a DataFrame with a float64 column per class, named by the
class, in the model's class order: the softmax of the logits (a multi-label model: a sigmoid per tag), the scores
predict answers.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import timm
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255, 255)  # what transparent pixels are composited on, as sidetune's decoding does
TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")
BATCH = 32  # rows per run of the graph: a large DataFrame is not one huge input tensor
PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # a GPU where onnxruntime has one, else the CPU


def decode(data: str) -> Image.Image:
    """A base64-encoded image file -> an upright RGB image."""
    with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in TRANSPARENT or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
        return im.convert("RGB")


def clip_indices(frames: int, video: dict[str, Any]) -> list[int]:
    """The frames of a video of `frames` frames that make its clip, as predict samples them: `uniform`, the centre
    of each of T equal segments; `strided`, T frames `frame_stride` apart, centred (a short video repeats frames)."""
    t = video["num_frames"]
    if video["sampling"] == "uniform":
        return [min(int(np.floor((i + 0.5) * (frames / t))), frames - 1) for i in range(t)]
    stride = video["frame_stride"]
    span = (t - 1) * stride + 1
    start = (frames - span) // 2 if frames >= span else 0
    return [min(start + i * stride, frames - 1) for i in range(t)]


def _frame_count(data: bytes) -> int:
    """The first video stream's frames: as its container records them, else by demuxing without decoding."""
    import av  # video models only (their requirements name PyAV)

    with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for p in container.demux(stream) if p.size and p.pts is not None)


def read_clip(data: str, video: dict[str, Any]) -> list[Image.Image]:
    """A base64-encoded video file -> the RGB frames of its clip, in order."""
    import av

    raw = base64.b64decode(data, validate=True)
    indices = clip_indices(_frame_count(raw), video)
    wanted, last, got = set(indices), max(indices), {}
    with av.open(io.BytesIO(raw), metadata_errors="ignore") as container:
        for n, frame in enumerate(container.decode(container.streams.video[0])):
            if n in wanted:
                got[n] = frame.to_image()
            if n >= last:
                break
    if not got:
        raise ValueError("no frame of the video could be decoded")
    fill = got[max(got)]  # a container that overstated its frame count: its last frame decoded repeats
    return [got.get(i, fill) for i in indices]


class SidetuneClassifier(mlflow.pyfunc.PythonModel):
    """Images or clips (base64) -> class probabilities, by the ONNX graph of artifact `onnx`."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        graph = Path(context.artifacts["onnx"]) / "model.onnx"
        providers = [p for p in PROVIDERS if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(graph), providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.classes: list[str] = json.loads(meta["classes"])
        self.multi_label = meta.get("multi_label") == "true"
        self.video: dict[str, Any] | None = json.loads(meta["video"]) if "video" in meta else None
        self.transform = timm.data.create_transform(**json.loads(meta["preprocessing"]))

    def _input(self, data: str) -> np.ndarray:
        """One row -> the graph's input for it: [3, H, W], or a clip's [T*3, H, W]."""
        if self.video is None:
            return self.transform(decode(data)).numpy()
        frames = [self.transform(frame) for frame in read_clip(data, self.video)]
        return torch.cat(frames).numpy()

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        rows = model_input["image" if self.video is None else "video"].tolist()
        logits = []
        for start in range(0, len(rows), BATCH):
            x = np.stack([self._input(data) for data in rows[start : start + BATCH]])
            logits.append(self.session.run(["logits"], {"pixel_values": x})[0])
        scores = torch.from_numpy(np.concatenate(logits) if logits else np.zeros((0, len(self.classes)), np.float32))
        scores = scores.sigmoid() if self.multi_label else scores.softmax(-1)
        return pd.DataFrame(scores.double().numpy(), columns=self.classes)


mlflow.models.set_model(SidetuneClassifier())
