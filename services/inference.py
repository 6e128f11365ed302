"""Inference: load adapted models from the artifact store and predict on images.

Backbones are shared: models on the same backbone (same name and weights hash) reuse one loaded backbone,
and `predict_many` runs that backbone once per image for all side models (linear, LoSA) on it. Adapted models
(APLA, ARC, LoRA, full) are merged into a plain ViT at load time, so each costs one backbone forward and
nothing more. The backbone's weights are checked against the hash recorded at training time, so a model never
silently runs on other weights.
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
        self.backbone_key = (config["backbone"]["name"], config["weights_hash"], str(config["data_config"]))


class Predictor:
    """Thread-safe; keeps up to `max_models` models and their backbones loaded (least recently used out)."""

    def __init__(self, settings: Settings, max_models: int = 16) -> None:
        self.settings = settings
        self.artifacts = ArtifactStore(settings.artifacts_dir)
        self.device = settings.torch_device()
        self.max_models = max_models
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

    def predict_many(self, model_ids: list[str], images: list[bytes]) -> dict[str, list[dict[str, Any]]]:
        """Decode once, run each distinct backbone once, apply every model; returns predictions per model."""
        models = [self.load(m) for m in model_ids]
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(load_image(data))
            except DatasetError as e:
                raise DatasetError(f"instance {i}: {e}") from None
        out: dict[str, list[dict[str, Any]]] = {}
        groups: dict[tuple, list[LoadedModel]] = {}
        for m in models:
            groups.setdefault(m.backbone_key, []).append(m)
        for group in groups.values():
            backbone = self._backbone(group[0].config)
            x = torch.stack([backbone.transform(im) for im in decoded]).to(self.device)
            side = [m for m in group if m.kind == "side"]
            layers = sorted({layer for m in side for layer in m.config["input_layers"]})
            feats = backbone.intermediates(x, layers) if side else None
            with torch.inference_mode():
                for m in group:
                    if m.kind == "side":
                        x_m = feats[:, [layers.index(layer) for layer in m.config["input_layers"]]]
                        tokens = m.config.get("input_tokens") or "all"  # as the model was trained
                        logits = m.module(pool_tokens(x_m, tokens, backbone.num_prefix_tokens))
                    else:
                        logits = m.module(x)
                    probs = logits.float().softmax(-1).cpu().numpy()
                    out[m.id] = [
                        {"label": m.classes[int(p.argmax())], "scores": {c: round(float(s), 6) for c, s in
                                                                         zip(m.classes, p, strict=True)}}
                        for p in probs
                    ]  # fmt: skip
        return out

    def predict(self, model_id: str, images: list[bytes]) -> list[dict[str, Any]]:
        return self.predict_many([model_id], images)[model_id]
