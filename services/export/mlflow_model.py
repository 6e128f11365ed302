"""Export as an MLflow model (`format=mlflow`): the pyfunc flavour, whose code is mlflow_pyfunc.py (an MLflow "model
from code": that file, copied into the export, needs onnxruntime, timm and mlflow, never sidetune) and whose artifact
`onnx` is the graph the `onnx` export writes (onnx_graph.py; its weights in a file beside it, so no 2 GB limit), with
the classes, preprocessing and clip sampling in its metadata; a signature (input: a string column, `image` or a video
model's `video`, each row a file in base64; output: a float64 column per class, named by the class, in the model's
order), an input example (a synthetic image, or clip, at the model's input size), the pinned requirements, and the
model card (card.py) as `README.md`; zipped. `mlflow.pyfunc.load_model` on the unzipped folder (or on
`models:/NAME/VERSION` once `sidetune models register` has registered it) gives predict's probabilities.

Every method, video models included, as `onnx` (it once wrapped the timm checkpoint, and took only the models timm
takes; the graph computes the same, and a side network and a ViViT too). The `mlflow` extra (`pip install
'sidetune[mlflow]'`: mlflow and onnxruntime, whose version the requirements pin) is needed in the inference service:
without it this format is refused, saying so.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import io
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from services.export import onnx_graph
from services.export.card import ModelFacts, model_card
from services.export.card_code import mlflow_folder
from services.models.loading import Trained
from services.models.manifest import Manifest

CODE = Path(__file__).with_name("mlflow_pyfunc.py")
# what CODE imports, pinned as installed here (torch and torchvision for timm's eval transform); PyAV for videos
REQUIREMENTS = ("onnxruntime", "timm", "torch", "torchvision", "pillow", "pandas", "numpy")
VIDEO_REQUIREMENTS = ("av",)


def refusal(manifest: Manifest) -> str | None:
    missing = [name for name in ("mlflow", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed in the inference service (pip install 'sidetune[mlflow]')"
    return onnx_graph.refusal(manifest)


def _column(trained: Trained) -> str:
    """The signature's input column: `image`, or a video model's `video`."""
    return "image" if trained.manifest.video is None else "video"


def _usage(trained: Trained) -> str:
    """The card's loading code: mlflow's pyfunc, files as base64 strings."""
    column = _column(trained)
    what = "an image file" if column == "image" else "a video file (mp4, webm, ...)"
    return f"""An MLflow model (pyfunc flavour running the ONNX graph `artifacts/onnx/model.onnx` with onnxruntime; its
code needs onnxruntime, timm and mlflow{", and PyAV" if column == "video" else ""}, not sidetune). Input: a DataFrame
with a string column `{column}`, each row {what} in base64; output: a DataFrame with a column per class, in the
model's order, holding predict's probabilities (`MLmodel` holds the signature).

{mlflow_folder(column)}"""


def _gradient(h: int, w: int, shift: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: a colour gradient, its phase moved by `shift`."""
    y, x = np.mgrid[0:h, 0:w]
    red, green = (x * 255 // max(w - 1, 1) + shift) % 256, y * 255 // max(h - 1, 1)
    return np.stack([red, green, np.full_like(x, 128)], axis=-1).astype(np.uint8)


def _example(trained: Trained) -> dict[str, list[str]]:
    """One synthetic input at the model's input size, as the signature takes it: a gradient as a PNG, or a clip of
    it moving (as many frames as the clip samples) as an mp4."""
    _, h, w = trained.input_shape
    video = trained.manifest.video
    if video is None:
        png = io.BytesIO()
        Image.fromarray(_gradient(h, w), "RGB").save(png, format="PNG")
        return {"image": [base64.b64encode(png.getvalue()).decode()]}
    from services.video.synthetic import write_video

    h, w = h + h % 2, w + w % 2  # H.264's 4:2:0 wants even sides
    frames = np.stack([_gradient(h, w, 8 * t) for t in range(video.frames_needed)])
    with tempfile.TemporaryDirectory(prefix="sidetune-example-") as tmp:
        data = write_video(Path(tmp) / "example.mp4", frames).read_bytes()
    return {"video": [base64.b64encode(data).decode()]}


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    graph = folder / "onnx"
    shutil.rmtree(graph, ignore_errors=True)
    graph.mkdir(parents=True)
    onnx_graph.save_graph(trained, facts, graph / "model.onnx", external_data=True)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, _column(trained))]),
        outputs=Schema([ColSpec(DataType.double, c) for c in trained.classes]),
    )
    requirements = REQUIREMENTS + (VIDEO_REQUIREMENTS if trained.manifest.video is not None else ())
    out = folder / "mlflow"
    shutil.rmtree(out, ignore_errors=True)  # mlflow writes only into a new folder; the other formats overwrite theirs
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(CODE),
        artifacts={"onnx": str(graph)},
        signature=signature,
        input_example=pd.DataFrame(_example(trained)),
        pip_requirements=[f"{name}=={_version(name)}" for name in requirements],
        metadata={"sidetune_model_id": trained.model_id, "classes": trained.classes},
    )
    (out / "README.md").write_text(model_card(facts, "mlflow", _usage(trained)))
    path = folder / "model-mlflow.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # weights hardly compress
        for f in sorted(out.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(out).as_posix())
    return path


def _version(distribution: str) -> str:
    """The installed version without a local part (`2.14.1+cu130` -> `2.14.1`): pip finds the public release."""
    return importlib.metadata.version(distribution).split("+", 1)[0]
