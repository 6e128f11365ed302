"""The python blocks of the exports' model cards (card.py's `USAGE_HEADING` section): code that runs as written where
the export is unzipped (the `onnx` export: where the graph was downloaded, under the name the service gives it), the
input a placeholder the reader replaces: the one line `paths = [...]  # your image files: ...` (a video model's:
`# your video files ...`), which names files beside the code (`PLACEHOLDERS`). Each block ends with `probs` (a row per
file, a column per class, predict's probabilities) printed per file.

Inputs are read as predict reads them: an image upright (EXIF orientation), RGB, through timm's eval transform of the
export's preprocessing; a clip (`onnx`: PyAV here, the frames predict samples, each frame through that transform,
stacked along the channels). The `adapter` layout's code uses sidetune's own readers (`AdapterModel.inputs`), the
`mlflow` model's its pyfunc's (mlflow_pyfunc.py). Torch-free: the CLI rewrites an `hf` card's (hf_card.py).
"""

from __future__ import annotations

from typing import Any

PLACEHOLDERS = {
    False: 'paths = ["image.jpg"]  # your image files: replace with yours',
    True: 'paths = ["clip.mp4"]  # your video files (mp4, webm, ...): replace with yours',
}
READ_IMAGES = """images = [ImageOps.exif_transpose(Image.open(path)).convert("RGB") for path in paths]  # upright"""
PRINT = """for path, row in zip(paths, probs.tolist()):
    print(path, dict(zip(classes, row)))"""


def scores(multi_label: bool, logits: str) -> str:
    """The code turning `logits` into predict's scores: a sigmoid per tag, or a softmax over the classes."""
    return f"{logits}.sigmoid()" if multi_label else f"{logits}.softmax(-1)"


def timm_folder(multi_label: bool, repo: str | None = None) -> str:
    """timm's Hub layout (`model.safetensors`, timm's `config.json`), timm alone: the folder this card is in, or the
    Hub repo `repo`."""
    if repo is None:
        imports = ""
        source = """folder = "."  # this folder, unzipped (where this README.md is)
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
config = json.load(open(f"{folder}/config.json"))"""
    else:
        imports = "from huggingface_hub import hf_hub_download\n"
        source = f"""model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
config = json.load(open(hf_hub_download("{repo}", "config.json")))"""
    return f"""```python
import json

import timm
import torch
{imports}from PIL import Image, ImageOps

{source}
transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))
classes = config["label_names"]  # the outputs' order

{PLACEHOLDERS[False]}
{READ_IMAGES}
with torch.inference_mode():
    probs = {scores(multi_label, "model(torch.stack([transform(image) for image in images]))")}
{PRINT}
```"""


def timm_by_name(name: str, classes: int, model_args: dict[str, Any]) -> str:
    """The `model = ...` line of `timm_folder` by the architecture's name and the weights file, at the image size it
    was trained at (`num_classes` in the overlay too: timm drops a classifier whose class count differs from its
    pretrained config's)."""
    extra = "".join(f", {k}={v!r}" for k, v in model_args.items())
    return f"""```python
model = timm.create_model(
    "{name}", pretrained=True, num_classes={classes}{extra},
    pretrained_cfg_overlay={{"file": f"{{folder}}/model.safetensors", "num_classes": {classes}}},
).eval()
```"""


def adapter_folder(multi_label: bool, clips: bool, repo: str | None = None) -> str:
    """The adapter layout (`adapter_model.safetensors`, `adapter_config.json`), sidetune's `load_adapter`: the folder
    this card is in, or the Hub repo `repo` downloaded."""
    if repo is None:
        imports, source = "", 'load_adapter(".")  # this folder, unzipped (where this README.md is)'
    else:
        imports = "from huggingface_hub import snapshot_download\n"
        source = f'load_adapter(snapshot_download("{repo}"))'
    what = "each file's clip sampled and read as predict does" if clips else "the files read as predict reads them"
    return f"""```python
import torch
{imports}from services.export.adapter import load_adapter

model = {source}
classes = model.classes  # the outputs' order

{PLACEHOLDERS[clips]}
with torch.inference_mode():
    probs = {scores(multi_label, "model(model.inputs(paths))")}  # inputs: {what}
{PRINT}
```"""


READ_CLIP = '''video = json.loads(meta["video"])  # the clip: `num_frames` frames, sampled `uniform` or `strided`


def read_clip(path):
    """The clip predict samples: `uniform`, the centre frame of each of `num_frames` equal segments; `strided`,
    `num_frames` frames `frame_stride` apart, centred (a short video repeats its last frame). Each frame through the
    transform, the frames stacked along the channels: [num_frames * 3, H, W]."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        n = stream.frames or len(frames)  # as the container records it, else as decoded
    t, stride = video["num_frames"], video["frame_stride"]
    if video["sampling"] == "uniform":
        indices = [min(int((i + 0.5) * (n / t)), n - 1) for i in range(t)]
    else:
        start = max((n - (t - 1) * stride - 1) // 2, 0)
        indices = [min(start + i * stride, n - 1) for i in range(t)]
    return torch.cat([transform(frames[min(i, len(frames) - 1)]) for i in indices])
'''


def onnx_file(filename: str, multi_label: bool, clips: bool) -> str:
    """One ONNX graph, onnxruntime and timm's eval transform of its metadata's preprocessing (PyAV for clips)."""
    if clips:
        imports, reader = "import av\n", f"\n{READ_CLIP}\n"
        batch = "torch.stack([read_clip(path) for path in paths]).numpy()"
    else:
        imports, reader = "", ""
        batch = "torch.stack([transform(image) for image in images]).numpy()"
    pil = "" if clips else "from PIL import Image, ImageOps\n"
    read = "" if clips else f"{READ_IMAGES}\n"
    return f"""```python
import json

{imports}import onnxruntime
import timm
import torch
{pil}
session = onnxruntime.InferenceSession("{filename}")  # the exported file, as downloaded
meta = session.get_modelmeta().custom_metadata_map
classes = json.loads(meta["classes"])  # the outputs' order
transform = timm.data.create_transform(**json.loads(meta["preprocessing"]))
{reader}
{PLACEHOLDERS[clips]}
{read}x = {batch}
probs = {scores(multi_label, 'torch.from_numpy(session.run(["logits"], {"pixel_values": x})[0])')}
{PRINT}
```"""


def mlflow_folder(column: str) -> str:
    """An MLflow model's pyfunc: files as base64 strings in a DataFrame's `column` (`image`, or `video`)."""
    return f"""```python
import base64

import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model(".")  # this folder, unzipped (where this README.md is); or "models:/NAME/VERSION"

{PLACEHOLDERS[column == "video"]}
files = pd.DataFrame({{"{column}": [base64.b64encode(open(path, "rb").read()).decode() for path in paths]}})
probs = model.predict(files)  # a column per class, in the model's order
for path, row in zip(paths, probs.to_dict("records")):
    print(path, row)
```"""
