"""Inference: predicting with loaded models (services/serving/loaded.py keeps them loaded) on images in the serving
dtype, or on videos for a model trained on clips (its modality, services/modality/, decodes them as its training data
was decoded and batches them).

- Serving dtype: bfloat16 on CUDA, float32 on the CPU (the backbone's `precision`, `auto` by default, unless
  `settings.predict_precision` sets one), for the backbones and the merged models; side models (linear, LoSA: small)
  keep float32 weights and run under bfloat16 autocast where the backbone is bfloat16, as in training.
- `run` passes the images of many requests through a backbone once for all side models on it, each reading only its
  own requests' rows (services/serving/batching.py gathers concurrent requests for it; `predict_many` runs each image
  once for several models); an adapted model (a merged ViT) runs once on its own requests' images.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from services.serving.loaded import LoadedModel, ModelCache
from services.serving.requests import Prediction
from storage.cache import pool_tokens

if TYPE_CHECKING:
    from services.modality.base import Kind


Request = tuple[LoadedModel, torch.Tensor]  # a model and its images, transformed: [n, 3, H, W] on the CPU (clips:
# [n, T*3, H, W])


def _side(module: torch.nn.Module, device_type: str, bf16: bool, features: torch.Tensor) -> torch.Tensor:
    """A side model on float32 features: float32 weights, bfloat16 matmuls where the backbone is bfloat16, as in
    training."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        return module(features)


def _scores(classes: list[str], p: np.ndarray, top_k: int | None) -> dict[str, float]:
    """Every class's score in the model's order, or the `top_k` highest, highest first."""
    if top_k is None or top_k >= len(classes):
        return {c: round(float(s), 6) for c, s in zip(classes, p, strict=True)}
    best = np.argpartition(-p, top_k - 1)[:top_k]
    return {classes[i]: round(float(p[i]), 6) for i in best[np.argsort(-p[best], kind="stable")]}


def format_predictions(
    model: LoadedModel, probs: np.ndarray, threshold: float | None = None, top_k: int | None = None
) -> list[Prediction]:
    """The v1 output: one {"label", "scores"} per image, "scores" holding every class's (or with `top_k` the k
    highest: a 21,843-class model's every score is about 600 KB of JSON an image); a multi-label model adds
    "labels", the tags whose score reaches `threshold` (default: the model's, chosen on validation)."""
    out = [Prediction(label=model.classes[int(p.argmax())], scores=_scores(model.classes, p, top_k)) for p in probs]
    if model.multi_label:
        t = model.threshold if threshold is None else threshold
        for pred, p in zip(out, probs, strict=True):
            pred["labels"] = [c for c, s in zip(model.classes, p, strict=True) if s >= t]
    return out


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over the classes, or a sigmoid per tag for a multi-label model."""
    return torch.sigmoid(logits.float()) if multi_label else logits.float().softmax(-1)


class Predictor(ModelCache):
    """Thread-safe. Loads models as `ModelCache` does and predicts with them: one request alone (`predict`), or the
    batches that services/serving/batching.py gathers (`inputs_many`, `run`)."""

    # ---- predicting ------------------------------------------------------------------------------------------
    def decode_for(self, model: LoadedModel, items: list[bytes], sent: Kind | None = None) -> list[Any]:
        """Encoded inputs as `model` takes them: PIL images (JPEGs far larger than the backbone's input decoded at a
        fraction of their size, as the loaders decode them for training), or for a model trained on videos its clips
        (uint8 [T, H, W, 3], sampled as its training clips were); `sent` is the kind the client said it sent (None:
        as the model expects). A DatasetError names the instance that could not be decoded or does not fit the
        model."""
        model.modality.check_sent(model.id, sent)
        return model.modality.decode(model.backbone, items, self.settings.max_predict_video_s)

    def inputs(self, model: LoadedModel | str, decoded: list[Any]) -> Request:
        """Decoded images as the model's backbone's input batch [n, 3, H, W] on the CPU (a model id is loaded);
        decoded clips (uint8 arrays) normalised into [n, T*3, H, W]."""
        model = self.load(model) if isinstance(model, str) else model
        return model, model.modality.to_batch(model.backbone, decoded)

    def inputs_many(self, models: list[LoadedModel], decoded: list[list[Any]]) -> list[Request]:
        """Each model's input batch, `decoded[i]` being models[i]'s decoded inputs. A list that several models on one
        backbone share (the very object) is transformed once, and they share the tensor, which `run` then passes
        through the backbone once for all of them."""
        batches: dict[tuple, torch.Tensor] = {}
        out = []
        for model, inputs in zip(models, decoded, strict=True):
            key = (model.backbone_key, id(inputs))
            if key not in batches:
                batches[key] = self.inputs(model, inputs)[1]
            out.append((model, batches[key]))
        return out

    def prepare(self, model_id: str, images: list[bytes]) -> Request:
        """Load the model, decode the images and transform them into its input batch."""
        model = self.load(model_id)
        return self.inputs(model, self.decode_for(model, images))

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
            for members in groups.values():
                backbone = requests[members[0]][0].backbone
                bf16 = backbone.dtype == torch.bfloat16
                side = [i for i in members if requests[i][0].kind == "side"]
                if side:
                    x, first = self._stack(requests, side, backbone.dtype)
                    layers = sorted({layer for i in side for layer in requests[i][0].manifest.input_layers})
                    feats = backbone.intermediates(x, layers)
                    for m, idx in self._by_model(requests, side).items():
                        f = feats
                        if m.manifest.input_layers != layers:
                            f = f[:, [layers.index(layer) for layer in m.manifest.input_layers]]
                        tokens = m.manifest.input_tokens or "all"  # as the model was trained
                        f = pool_tokens(f.float(), tokens, backbone.num_prefix_tokens)
                        side_model = partial(_side, m.module, backbone.device.type, bf16)
                        self._apply(side_model, f, requests, [(i, first[i]) for i in idx], out, m.multi_label)
                adapted = [i for i in members if requests[i][0].kind != "side"]
                for m, idx in self._by_model(requests, adapted).items():
                    x, first = self._stack(requests, idx, backbone.dtype)
                    self._apply(m.module, x, requests, [(i, first[i]) for i in idx], out, m.multi_label)
        return out

    def _stack(
        self, requests: list[Request], idx: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """The images of requests `idx` as one batch on the device in `dtype` (the serving dtype), and each request's
        first row in it. A tensor that several requests share (`predict_many` gives every model the same images) is in
        the batch once."""
        parts: list[torch.Tensor] = []
        start: dict[int, int] = {}
        rows = 0
        for i in idx:
            images = requests[i][1]
            if id(images) not in start:
                start[id(images)], rows = rows, rows + len(images)
                parts.append(images)
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x.to(self.device, dtype), {i: start[id(requests[i][1])] for i in idx}

    @staticmethod
    def _by_model(requests: list[Request], idx: list[int]) -> dict[LoadedModel, list[int]]:
        groups: dict[LoadedModel, list[int]] = {}
        for i in idx:
            groups.setdefault(requests[i][0], []).append(i)
        return groups

    @staticmethod
    def _apply(
        module: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        requests: list[Request],
        where: list[tuple[int, int]],
        out: list[np.ndarray],
        multi_label: bool = False,
    ) -> None:
        """Run `module` on the rows of x that the requests in `where` ((request, first row) pairs) own, and hand
        each request its own rows' probabilities."""
        spans = [(i, first, len(requests[i][1])) for i, first in where]
        rows = [r for _, first, n in spans for r in range(first, first + n)]
        logits = module(x if rows == list(range(len(x))) else x[rows])
        probs = probabilities(logits, multi_label).cpu().numpy()
        done = 0
        for i, _, n in spans:
            out[i], done = probs[done : done + n], done + n

    format = staticmethod(format_predictions)

    def predict_many(self, model_ids: list[str], images: list[bytes]) -> dict[str, list[Prediction]]:
        """Decode once, run each distinct backbone once, apply every model; returns predictions per model."""
        models = [self.load(m) for m in model_ids]
        decoded: dict[Hashable, list[Any]] = {}  # by what decoding depends on (images: the draft size)
        for m in models:
            key = m.modality.decoding_key(m.backbone_key, m.backbone)
            if key not in decoded:
                decoded[key] = self.decode_for(m, images)
        inputs = [decoded[m.modality.decoding_key(m.backbone_key, m.backbone)] for m in models]
        probs = self.run(self.inputs_many(models, inputs))
        return {m.id: self.format(m, p) for m, p in zip(models, probs, strict=True)}

    def predict(
        self, model_id: str, images: list[bytes], sent: Kind | None = None, threshold: float | None = None
    ) -> list[Prediction]:
        """One request on its own (the inference service goes through services.serving.batching.Batcher); images, or
        videos for a model trained on clips (`sent`: the kind the client said it sent); `threshold` overrides a
        multi-label model's own."""
        model = self.load(model_id)
        model, x = self.inputs(model, self.decode_for(model, images, sent))
        return self.format(model, self.run([(model, x)])[0], threshold)
