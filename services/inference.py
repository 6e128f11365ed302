"""Inference: load adapted models from the artifact store and predict on images.

Backbones are shared: models on the same backbone (same name and weights hash) reuse one loaded backbone, and
`run` passes the images of many requests through that backbone once for all side models (linear, LoSA) on it, each
side model reading only its own requests' rows (services/batching.py gathers concurrent requests for it; the
`predict_many` of one request for several models runs each image once). Adapted models (APLA, ARC, LoRA, full) are
merged into a plain ViT at load time, so each costs one backbone forward and nothing more. The backbone's weights
are checked against the hash recorded at training time, so a model never silently runs on other weights.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter

from services import methods
from services.backbones import Backbone, load_backbone
from services.datasets import DatasetError, check_path, load_image
from services.methods.readout import FeatureInfo, Readout
from services.spec import BackboneSpec
from storage.artifacts import ArtifactStore
from storage.cache import pool_tokens
from storage.settings import Settings


class LoadedModel:
    def __init__(self, model_id: str, module: torch.nn.Module, config: dict[str, Any]) -> None:
        self.id, self.module, self.config = model_id, module, config
        self.classes: list[str] = config["classes"]
        self.kind: str = config.get("kind", "side")
        self.multi_label: bool = config.get("multi_label", False)
        self.threshold: float | None = config.get("threshold")
        self.backbone_key = (config["backbone"]["name"], config["weights_hash"], str(config["data_config"]))


Request = tuple[LoadedModel, torch.Tensor]  # a model and its images, transformed: [n, 3, H, W] on the CPU


class Predictor:
    """Thread-safe; keeps up to `max_models` (default: `settings.predict_max_models`) models and their backbones
    loaded (least recently used model out; backbones stay)."""

    def __init__(self, settings: Settings, max_models: int | None = None) -> None:
        self.settings = settings
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self.device = settings.torch_device()
        self.max_models = max_models or settings.predict_max_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._backbones: dict[tuple, Backbone] = {}
        self._lock = threading.Lock()

    def _backbone(self, config: dict[str, Any]) -> Backbone:
        spec = BackboneSpec.model_validate(config["backbone"])
        key = (spec.name, config["weights_hash"], str(config["data_config"]))
        if key not in self._backbones:
            ckpt = check_path(spec.checkpoint, self.settings.roots) if spec.checkpoint else None
            backbone = load_backbone(spec, self.device, ckpt)
            if backbone.weights_hash != config["weights_hash"]:
                raise RuntimeError(f"backbone {spec.name} now has other weights than the model was trained on")
            self._backbones[key] = backbone
        return self._backbones[key]

    def load(self, model_id: str) -> LoadedModel:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            weights, config = self.artifacts.load_model(model_id)
            method_config = TypeAdapter(methods.MethodConfig).validate_python(config["method"])
            state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
            backbone = self._backbone(config)
            if config.get("kind", "side") == "side":
                info = FeatureInfo(**config["feature_info"], readout=Readout.tensors_from_state(weights))
                module = methods.build(method_config, info)
                module.load_trainable(state)
            else:
                vit = copy.deepcopy(backbone.model)
                adapted = methods.build(method_config, vit, len(config["classes"]), config["tail_blocks"])
                adapted.load_trainable({k: v.to(self.device) for k, v in state.items()})
                module = adapted.merge()  # a plain ViT: inference costs one backbone forward
            loaded = LoadedModel(model_id, module.to(self.device).eval(), config)
            self._models[model_id] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return loaded

    def backbone_of(self, model: LoadedModel) -> Backbone:
        return self._backbones[model.backbone_key]  # loaded with the model; backbones are never unloaded

    def decode(self, images: list[bytes]) -> list[Any]:
        """PIL images; a DatasetError names the instance that could not be decoded."""
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(load_image(data))
            except DatasetError as e:
                raise DatasetError(f"instance {i}: {e}") from None
        return decoded

    def prepare(self, model_id: str, images: list[bytes]) -> Request:
        """Decode the images, load the model and transform them into its input batch."""
        return self.inputs(model_id, self.decode(images))

    def inputs(self, model_id: str, decoded: list[Any]) -> Request:
        """Load the model and transform decoded images into its backbone's input batch [n, 3, H, W] on the CPU."""
        model = self.load(model_id)
        transform = self.backbone_of(model).transform
        return model, torch.stack([transform(im) for im in decoded])

    def run(self, requests: list[Request]) -> list[np.ndarray]:
        """Class probabilities [n_i, classes] for each (model, images [n_i, 3, H, W]) request. Per backbone, the
        images of all requests for side models go through ONE backbone pass that taps the union of their layers,
        and each side model reads only its own requests' rows; an adapted model (a merged ViT) runs once on the
        images of its own requests."""
        out: list[np.ndarray] = [np.empty(0)] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (m, _) in enumerate(requests):
            groups.setdefault(m.backbone_key, []).append(i)
        with torch.inference_mode():
            for key, members in groups.items():
                backbone = self._backbones[key]
                side = [i for i in members if requests[i][0].kind == "side"]
                if side:
                    x, first = self._stack(requests, side)
                    layers = sorted({layer for i in side for layer in requests[i][0].config["input_layers"]})
                    feats = backbone.intermediates(x, layers)
                    for m, idx in self._by_model(requests, side).items():
                        f = feats
                        if m.config["input_layers"] != layers:
                            f = f[:, [layers.index(layer) for layer in m.config["input_layers"]]]
                        tokens = m.config.get("input_tokens") or "all"  # as the model was trained
                        f = pool_tokens(f, tokens, backbone.num_prefix_tokens)
                        self._apply(m, f, requests, [(i, first[i]) for i in idx], out)
                adapted = [i for i in members if requests[i][0].kind != "side"]
                for m, idx in self._by_model(requests, adapted).items():
                    x, first = self._stack(requests, idx)
                    self._apply(m, x, requests, [(i, first[i]) for i in idx], out)
        return out

    def _stack(self, requests: list[Request], idx: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        """The images of requests `idx` as one batch on the device, and each request's first row in it. A tensor that
        several requests share (`predict_many` gives every model the same images) is in the batch once."""
        parts: list[torch.Tensor] = []
        start: dict[int, int] = {}
        rows = 0
        for i in idx:
            images = requests[i][1]
            if id(images) not in start:
                start[id(images)], rows = rows, rows + len(images)
                parts.append(images)
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.to(self.device), {i: start[id(requests[i][1])] for i in idx}

    @staticmethod
    def _by_model(requests: list[Request], idx: list[int]) -> dict[LoadedModel, list[int]]:
        groups: dict[LoadedModel, list[int]] = {}
        for i in idx:
            groups.setdefault(requests[i][0], []).append(i)
        return groups

    @staticmethod
    def _apply(model: LoadedModel, x: torch.Tensor, requests: list[Request], where: list[tuple[int, int]],
               out: list[np.ndarray]) -> None:  # fmt: skip
        """Run the model on the rows of x that the requests in `where` ((request, first row) pairs) own, and hand
        each request its own rows' probabilities."""
        spans = [(i, first, len(requests[i][1])) for i, first in where]
        rows = [r for _, first, n in spans for r in range(first, first + n)]
        x = x if rows == list(range(len(x))) else x[rows]
        dtype = next(model.module.parameters()).dtype  # a merged ViT runs in its backbone's precision (bf16 on a GPU)
        probs = probabilities(model, model.module(x.to(dtype) if x.is_floating_point() else x)).cpu().numpy()
        done = 0
        for i, _, n in spans:
            out[i], done = probs[done : done + n], done + n

    @staticmethod
    def format(model: LoadedModel, probs: np.ndarray, threshold: float | None = None) -> list[dict[str, Any]]:
        """One {"label", "scores"} per image; a multi-label model adds "labels", the tags whose score reaches
        `threshold` (default: the model's, chosen on validation)."""
        out = [
            {"label": model.classes[int(p.argmax())],
             "scores": {c: round(float(s), 6) for c, s in zip(model.classes, p, strict=True)}}
            for p in probs
        ]  # fmt: skip
        if model.multi_label:
            t = model.threshold if threshold is None else threshold
            for pred, p in zip(out, probs, strict=True):
                pred["labels"] = [c for c, s in zip(model.classes, p, strict=True) if s >= t]
        return out

    def predict_many(self, model_ids: list[str], images: list[bytes]) -> dict[str, list[dict[str, Any]]]:
        """Decode once, run each distinct backbone once, apply every model; returns predictions per model."""
        models = [self.load(m) for m in model_ids]
        decoded = self.decode(images)
        batches: dict[tuple, torch.Tensor] = {}  # one per backbone: their transforms may differ
        for m in models:
            if m.backbone_key not in batches:
                transform = self.backbone_of(m).transform
                batches[m.backbone_key] = torch.stack([transform(im) for im in decoded])
        probs = self.run([(m, batches[m.backbone_key]) for m in models])
        return {m.id: self.format(m, p) for m, p in zip(models, probs, strict=True)}

    def predict(self, model_id: str, images: list[bytes], threshold: float | None = None) -> list[dict[str, Any]]:
        """One request on its own (the API goes through services.batching.Batcher, which batches requests)."""
        model, x = self.prepare(model_id, images)
        return self.format(model, self.run([(model, x)])[0], threshold)


def probabilities(model: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes, or a sigmoid per tag for a multi-label model."""
    return torch.sigmoid(logits.float()) if model.multi_label else logits.float().softmax(-1)
