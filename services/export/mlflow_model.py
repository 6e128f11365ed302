"""Export as an MLflow model (`format=mlflow`): the pyfunc flavour, whose code is mlflow_pyfunc.py (an MLflow "model
from code": that file, copied into the export, needs torch, timm and mlflow, never sidetune) and whose artifact `timm`
is the folder the `timm` export carries (timm_checkpoint.py: `model.safetensors`, timm's `config.json`,
`sidetune.json`); a signature (input: a string column `image`, each row an image file in base64; output: a float64
column per class, named by the class, in the model's order), an input example (a synthetic image at the model's input
size), the pinned requirements, and the model card (card.py) as `README.md`; zipped. `mlflow.pyfunc.load_model` on
the unzipped folder (or on `models:/NAME/VERSION` once `sidetune models register` has registered it) gives predict's
probabilities.

For the models a timm checkpoint holds (APLA, ARC, LoRA, full; a linear probe read out by timm's head): the same
refusals as `timm`. mlflow is an optional extra (`pip install 'sidetune[mlflow]'`): without it in the inference
service this format is refused, saying so.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from services.export import timm_checkpoint
from services.export.card import ModelFacts, model_card
from services.models.loading import Trained
from services.models.manifest import Manifest

CODE = Path(__file__).with_name("mlflow_pyfunc.py")
REQUIREMENTS = ("torch", "timm", "safetensors", "pillow", "pandas")  # what CODE imports, pinned as installed here


def refusal(manifest: Manifest) -> str | None:
    if importlib.util.find_spec("mlflow") is None:
        return "mlflow is not installed in the inference service (pip install 'sidetune[mlflow]')"
    reason = timm_checkpoint.refusal(manifest)
    if reason is not None:
        return f"{reason} (an mlflow export wraps the timm checkpoint, which timm alone loads)"
    return None


def _usage(model_id: str) -> str:
    """The card's loading code: mlflow's pyfunc, images as base64 strings."""
    return f"""An MLflow model (pyfunc flavour; its code needs torch, timm and mlflow, not sidetune). Input: a
DataFrame with a string column `image`, each row an image file in base64; output: a DataFrame with a column per
class, in the model's order, holding predict's probabilities (`MLmodel` holds the signature).

```python
import base64, mlflow, pandas as pd

model = mlflow.pyfunc.load_model("{model_id}-mlflow")  # this folder, unzipped; or "models:/NAME/VERSION"
images = pd.DataFrame({{"image": [base64.b64encode(open(p, "rb").read()).decode() for p in paths]}})
probs = model.predict(images)  # a column per class
```"""


def _example(trained: Trained) -> dict[str, list[str]]:
    """One synthetic image (a colour gradient) at the model's input size, as the signature takes it."""
    _, h, w = trained.input_shape
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], axis=-1)
    png = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(png, format="PNG")
    return {"image": [base64.b64encode(png.getvalue()).decode()]}


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    timm_dir = folder / "timm"
    timm_checkpoint.save_timm(trained, timm_dir)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema([ColSpec(DataType.double, c) for c in trained.classes]),
    )
    out = folder / "mlflow"
    shutil.rmtree(out, ignore_errors=True)  # mlflow writes only into a new folder; the other formats overwrite theirs
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(CODE),
        artifacts={"timm": str(timm_dir)},
        signature=signature,
        input_example=pd.DataFrame(_example(trained)),
        pip_requirements=[f"{name}=={_version(name)}" for name in REQUIREMENTS],
        metadata={"sidetune_model_id": trained.model_id, "classes": trained.classes},
    )
    (out / "README.md").write_text(model_card(facts, "mlflow", _usage(trained.model_id)))
    path = folder / "model-mlflow.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # safetensors hardly compress
        for f in sorted(out.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(out).as_posix())
    return path


def _version(distribution: str) -> str:
    """The installed version without a local part (`2.14.1+cu130` -> `2.14.1`): pip finds the public release."""
    return importlib.metadata.version(distribution).split("+", 1)[0]
