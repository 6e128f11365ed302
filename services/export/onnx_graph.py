"""Export as ONNX: the whole model, backbone plus merged head or side network, as one graph (`torch.onnx.export`,
the torch.export-based exporter) with a dynamic batch. Input `pixel_values` float32 [N, 3, H, W] (a video model's:
[N, T*3, H, W], the T frames of a clip stacked along the channels); output `logits` float32 [N, classes], whose
softmax is what predict answers. The metadata (`metadata_props`) holds what a runtime needs besides the graph:
`classes` (JSON, in output order), `preprocessing` (JSON: input size, interpolation, crop, mean and std, as timm's
data config), `video` (JSON, the clip sampling) for a video model, `multi_label` and `threshold` for a multi-label
one (a sigmoid per tag), `model_id`, `method`, `backbone`, a description of the input and output, and
`model_card` (card.py: the README.md the other formats carry).

One file holds the weights inline, so a model over ONNX's 2 GB protobuf limit is refused: export `timm`, `adapter` or
`mlflow` (whose graph, `save_graph` with `external_data`, keeps its weights in a file beside it).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from services.export import ExportError
from services.export.card import ModelFacts, model_card
from services.export.card_code import onnx_file
from services.modality import modality_for
from services.models.loading import Trained
from services.models.manifest import Manifest

MAX_BYTES = 2_000_000_000  # protobuf's limit on one message, less room for the graph


def refusal(manifest: Manifest) -> str | None:
    return None  # every method: the side networks are traced with their backbone


def _usage(trained: Trained) -> str:
    """The card's loading code: onnxruntime, the preprocessing (and a video model's clip sampling) from the graph's
    metadata, in the folder the graph was downloaded to under the service's name for it."""
    manifest = trained.manifest
    clips = manifest.video is not None
    return f"""One graph, no sidetune needed: input `pixel_values`, output `logits`; the metadata holds `classes`,
`preprocessing` (timm's data config){" and `video` (the clip sampling; PyAV decodes the clips here)" if clips else ""}.

{onnx_file(f"{trained.model_id}.onnx", manifest.multi_label, clips)}"""


def metadata(trained: Trained, facts: ModelFacts) -> dict[str, str]:
    manifest = trained.manifest
    modality = modality_for(manifest)
    _, h, w = trained.input_shape
    layout = modality.input_layout(h, w)
    props = {
        "model_id": trained.model_id,
        "classes": json.dumps(trained.classes),
        "preprocessing": json.dumps(manifest.preprocessing.data_config()),
        "method": manifest.method.model_dump_json(),
        "backbone": manifest.backbone.model_dump_json(),
        "pixel_values": f"{layout}, each image resized and cropped as `preprocessing` says, scaled to [0, 1], then "
        "normalised: (x - mean) / std",
        "logits": f"float32 [N, {len(trained.classes)}]: one logit per class of `classes`; softmax gives predict's "
        "scores",
        "model_card": model_card(facts, "onnx", _usage(trained)),
    }
    if manifest.multi_label:
        props["logits"] = (
            f"float32 [N, {len(trained.classes)}]: one logit per tag of `classes`; a sigmoid gives "
            "predict's scores, and a tag is predicted from `threshold` on"
        )
        props["multi_label"], props["threshold"] = "true", json.dumps(manifest.threshold)
    return props | modality.export_metadata()  # a video model's clip sampling


def write(trained: Trained, folder: Path, facts: ModelFacts) -> Path:
    module = trained.module
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}  # shared ones once
    if sum(tensors.values()) > MAX_BYTES:
        raise ExportError(
            f"the model's {sum(tensors.values()) / 1e9:.1f} GB of weights exceed what one ONNX file "
            "holds (2 GB); export `timm`, `adapter` or `mlflow` (its graph keeps the weights beside it)"
        )
    return save_graph(trained, facts, folder / "model.onnx")


def save_graph(trained: Trained, facts: ModelFacts, path: Path, external_data: bool = False) -> Path:
    """Export the model's graph with its metadata to `path`. With `external_data` its weights go to a file beside
    it (`<name>.data`, found by onnxruntime next to the graph), so no 2 GB limit applies: the mlflow export's folder
    (mlflow_model.py) holds both."""
    example = torch.randn(2, *trained.input_shape)
    batch = torch.export.Dim("batch", min=1, max=65_536)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            trained.module,
            (example,),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(trained, facts))
    if not external_data:
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(path))
        return path
    onnx.save_model(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")
    onnx.checker.check_model(str(path))  # by path: the checker reads the weights beside the graph
    return path
