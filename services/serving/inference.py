"""Inference: adapted models loaded from the artifact store, predicting on images in the serving dtype, or on videos
for a model trained on clips (services/video/serving.py decodes them as its training data was).

- Serving dtype: bfloat16 on CUDA, float32 on the CPU (the backbone's `precision`, `auto` by default, unless
  `settings.predict_precision` sets one), for the backbones and the merged models; side models (linear, LoSA: small)
  keep float32 weights and run under bfloat16 autocast where the backbone is bfloat16, as in training.
- One frozen backbone per (name, weights hash, preprocessing) serves every model on it. `run` passes the images of
  many requests through a backbone once for all side models on it, each reading only its own requests' rows
  (services/serving/batching.py gathers concurrent requests for it; `predict_many` runs each image once for several
  models).
- Models are rebuilt from their artifacts by services/models/loading.py (`load_trained`, as the exporters do).
  Adapted models (APLA, ARC, LoRA, full) are merged into a plain ViT at load time, built on a float32 copy on the
  CPU (the method folds its weights as it did in training). The merged ViT then keeps only the tensors that differ
  from its backbone's, in the serving dtype: every other parameter IS the backbone's tensor, so a merged model costs
  what it changed and one backbone forward per image.
- Loaded weights stay under `settings.predict_memory_mb` (bytes, not a count): least recently used models go first,
  and a backbone goes once no loaded model uses it. With `registered` (the inference service passes the job store's),
  each load also drops the loaded models that were deleted since: no request reaches them again (ids are never
  reused), yet a soak of jobs deleted as they came saw them fill the budget a few MB a minute.
- `load` is thread-safe and runs on the caller's thread: the inference service calls it from a loader thread, never
  from the batching one, so a cold load does not stall warm models; concurrent loads of one model load it once.
- A backbone's weights are checked against the hash recorded at training time, so a model never silently runs on
  other weights (`BackboneChanged`, 409). A model whose artifact is not whole on the store raises `Incomplete`, and
  is never half-loaded.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from functools import cached_property, partial
from itertools import chain
from typing import Any

import numpy as np
import torch

from services.backbones import PRECISIONS, Backbone, resolve_precision
from services.data.datasets import DatasetError, load_image
from services.data.images import draft_size
from services.models.loading import load_backbone_for, load_trained, read_artifact
from services.models.manifest import Manifest
from services.paths import UserPaths
from storage.artifacts import ArtifactStore
from storage.cache import pool_tokens
from storage.settings import Settings

log = logging.getLogger("sidetune.inference")


def serving_dtype(device: str, precision: str = "auto") -> torch.dtype:
    """The dtype backbones and merged models are served in: bfloat16 on CUDA and float32 on the CPU for `auto`."""
    return PRECISIONS[resolve_precision(precision, device)]


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return chain(module.named_parameters(), module.named_buffers())


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, t in _tensors(module))


class LoadedModel:
    def __init__(
        self,
        model_id: str,
        module: torch.nn.Module,
        manifest: Manifest,
        backbone: Backbone,
        backbone_key: tuple,
        nbytes: int,
    ) -> None:
        self.id, self.module, self.manifest, self.backbone = model_id, module, manifest, backbone
        self.classes: list[str] = manifest.classes
        self.kind: str = manifest.kind
        self.multi_label: bool = manifest.multi_label
        self.threshold: float | None = manifest.threshold
        self.backbone_key = backbone_key  # (name, weights hash, preprocessing, precision)
        self.nbytes = nbytes  # what the model holds beyond its backbone

    @cached_property
    def config(self) -> dict[str, Any]:
        """The manifest as its `config.json` holds it, for the code that still reads it by key (video decoding,
        services/video/serving.py); new code reads `manifest`."""
        return self.manifest.to_dict()


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
) -> list[dict[str, Any]]:
    """The v1 output: one {"label", "scores"} per image, "scores" holding every class's (or with `top_k` the k
    highest: a 21,843-class model's every score is about 600 KB of JSON an image); a multi-label model adds
    "labels", the tags whose score reaches `threshold` (default: the model's, chosen on validation)."""
    out = [{"label": model.classes[int(p.argmax())], "scores": _scores(model.classes, p, top_k)} for p in probs]
    if model.multi_label:
        t = model.threshold if threshold is None else threshold
        for pred, p in zip(out, probs, strict=True):
            pred["labels"] = [c for c, s in zip(model.classes, p, strict=True) if s >= t]
    return out


def probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Softmax over the classes, or a sigmoid per tag for a multi-label model."""
    return torch.sigmoid(logits.float()) if multi_label else logits.float().softmax(-1)


class Predictor:
    """Thread-safe. Keeps models and their backbones loaded within `memory_bytes` (default: the settings')."""

    def __init__(
        self,
        settings: Settings,
        memory_bytes: int | None = None,
        registered: Callable[[list[str]], set[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.registered = registered  # which of these model ids still exist
        self.artifacts = ArtifactStore.from_settings(settings)
        self.device = settings.torch_device()
        self.precision = None if settings.predict_precision == "auto" else settings.predict_precision  # None: spec's
        self.memory_bytes = memory_bytes or int(settings.predict_memory_mb * 2**20)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._backbones: dict[tuple, Backbone] = {}  # held: counted against the budget
        self._alive: weakref.WeakValueDictionary[tuple, Backbone] = weakref.WeakValueDictionary()  # still referenced
        self._loading: dict[str, Future] = {}
        self._lock = threading.Lock()  # guards the dicts above; never held while loading
        self._backbone_lock = threading.Lock()  # one backbone load at a time

    # ---- loading ---------------------------------------------------------------------------------------------
    def cached(self, model_id: str) -> LoadedModel | None:
        """The model if it is loaded (marked as just used), without loading it."""
        with self._lock:
            model = self._models.get(model_id)
            if model is not None:
                self._models.move_to_end(model_id)
            return model

    def load(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it on this thread if needed (a concurrent load of it is waited for).
        FileNotFoundError: no such artifact; storage.store.Incomplete: not whole on the store;
        StoreUnavailable: the store cannot be reached."""
        with self._lock:
            model = self._models.get(model_id)
            if model is not None:
                self._models.move_to_end(model_id)
                return model
            pending = self._loading.get(model_id)
            if pending is None:
                pending = self._loading[model_id] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return pending.result()
        try:
            model = self._load(model_id)
        except BaseException as e:
            with self._lock:
                del self._loading[model_id]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._loading[model_id]
            self._insert(model)
        pending.set_result(model)
        self._forget_deleted()
        return model

    def _insert(self, model: LoadedModel) -> None:
        """Add a loaded model and drop least recently used ones (and backbones left unused) to fit the budget."""
        self._models[model.id] = model
        self._backbones[model.backbone_key] = model.backbone
        while self.memory_used() > self.memory_bytes and len(self._models) > 1:
            self._drop(next(iter(self._models)))
        if self.memory_used() > self.memory_bytes:
            log.warning(
                "model %s with its backbone (%.0f MB) alone exceeds predict_memory_mb (%.0f MB)",
                model.id,
                self.memory_used() / 2**20,
                self.memory_bytes / 2**20,
            )

    def _drop(self, model_id: str) -> None:
        old = self._models.pop(model_id)
        if all(m.backbone_key != old.backbone_key for m in self._models.values()):
            self._backbones.pop(old.backbone_key, None)

    def _forget_deleted(self) -> None:
        """Drop the loaded models whose records are gone (never a reason to fail the load that called this)."""
        if self.registered is None:
            return
        with self._lock:
            loaded = list(self._models)
        try:
            alive = self.registered(loaded)
        except Exception as e:  # the registry is unreachable: the next load tries again
            log.warning("could not check which loaded models were deleted: %s", e)
            return
        with self._lock:
            for model_id in loaded:
                if model_id not in alive and model_id in self._models:
                    self._drop(model_id)

    def memory_used(self) -> int:
        """Bytes of the weights held: every backbone once, plus each model's own tensors."""
        return sum(tensor_bytes(b.model) for b in self._backbones.values()) + sum(
            m.nbytes for m in self._models.values()
        )

    def memory(self) -> dict[str, Any]:
        """What is loaded and what it holds, in bytes."""
        with self._lock:
            backbones = {
                f"{b.spec.name}@{b.data_config['input_size'][-1]}px:{b.weights_hash[:8]}:{b.precision}": tensor_bytes(
                    b.model
                )
                for b in self._backbones.values()
            }
            return {
                "models": {m.id: m.nbytes for m in self._models.values()},
                "backbones": backbones,
                "total": self.memory_used(),
                "budget": self.memory_bytes,
            }

    def _backbone(self, manifest: Manifest) -> tuple[tuple, Backbone]:
        precision = resolve_precision(self.precision or manifest.backbone.precision, self.device)
        key = (manifest.backbone.name, manifest.weights_hash, str(manifest.preprocessing.data_config()), precision)
        with self._backbone_lock:
            backbone = self._alive.get(key)
            if backbone is None:  # its checkpoint file checked again (it may have moved), in the serving dtype
                backbone = load_backbone_for(manifest, UserPaths(self.settings), self.device, precision)
                self._alive[key] = backbone
            return key, backbone

    def _load(self, model_id: str) -> LoadedModel:
        artifact = read_artifact(self.artifacts, model_id)
        key, backbone = self._backbone(artifact.manifest)
        trained = load_trained(artifact, backbone=backbone, shared=True)
        if trained.side is not None:  # run() taps the shared backbone once for every side model on it
            module = trained.side.to(self.device).eval()
            return LoadedModel(model_id, module, artifact.manifest, backbone, key, tensor_bytes(module))
        module, nbytes = self._share(trained.module, backbone)
        return LoadedModel(model_id, module, artifact.manifest, backbone, key, nbytes)

    def _share(self, merged: torch.nn.Module, backbone: Backbone) -> tuple[torch.nn.Module, int]:
        """A merged ViT (float32, on the CPU) on the device, sharing every tensor it did not change with the backbone
        and holding the others in the serving dtype; returns it and the bytes of the tensors it owns."""
        reference = dict(_tensors(backbone.model))
        params = {name for name, _ in merged.named_parameters()}
        owned = 0
        for name, t in list(_tensors(merged)):
            ref = reference.get(name)
            if ref is not None and ref.shape == t.shape and torch.equal(ref.detach().to("cpu", t.dtype), t.detach()):
                tensor = ref  # unchanged: the backbone's own tensor, on the device in the serving dtype
            else:
                tensor = t.detach().to(self.device, backbone.dtype if t.is_floating_point() else t.dtype)
                owned += tensor.numel() * tensor.element_size()
            owner_name, _, leaf = name.rpartition(".")
            owner = merged.get_submodule(owner_name) if owner_name else merged
            if name in params and not isinstance(tensor, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            setattr(owner, leaf, tensor)
        return merged, owned

    # ---- predicting ------------------------------------------------------------------------------------------
    def decode(self, images: list[bytes], draft: int | None = None) -> list[Any]:
        """PIL images (JPEGs far larger than `draft` decoded at a fraction of their size, as the loaders decode them
        for training: services/data/images.py); a DatasetError names the instance that could not be decoded."""
        decoded = []
        for i, data in enumerate(images):
            try:
                decoded.append(load_image(data, draft))
            except DatasetError as e:
                raise DatasetError(f"instance {i}: {e}") from None
        return decoded

    def decode_for(self, model: LoadedModel, items: list[bytes], video: bool | None = None) -> list[Any]:
        """Encoded inputs as `model` takes them: PIL images, or for a model trained on videos its clips (uint8
        [T, H, W, 3], sampled as its training clips were); `video` is what the client said it sent (None: as the
        model expects). A DatasetError names the instance that could not be decoded or does not fit the model."""
        from services.video.serving import decode_for

        images = partial(self.decode, draft=draft_size(model.backbone.transform))  # as its loaders decoded them
        return decode_for(
            model.id, model.config, model.backbone, items, video, images, self.settings.max_predict_video_s
        )

    def inputs(self, model: LoadedModel | str, decoded: list[Any]) -> Request:
        """Decoded images as the model's backbone's input batch [n, 3, H, W] on the CPU (a model id is loaded);
        decoded clips (uint8 arrays) normalised into [n, T*3, H, W]."""
        model = self.load(model) if isinstance(model, str) else model
        if decoded and isinstance(decoded[0], np.ndarray):
            return model, model.backbone.split.to_input(np.stack(decoded))
        transform = model.backbone.transform
        return model, torch.stack([transform(im) for im in decoded])

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
        return self.inputs(model, self.decode(images, draft_size(model.backbone.transform)))

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

    def predict_many(self, model_ids: list[str], images: list[bytes]) -> dict[str, list[dict[str, Any]]]:
        """Decode once, run each distinct backbone once, apply every model; returns predictions per model."""
        models = [self.load(m) for m in model_ids]
        decoded: dict[int | None, list[Any]] = {}  # by draft size, which follows the backbone's resize
        for m in models:
            draft = draft_size(m.backbone.transform)
            if draft not in decoded:
                decoded[draft] = self.decode(images, draft)
        inputs = [decoded[draft_size(m.backbone.transform)] for m in models]
        probs = self.run(self.inputs_many(models, inputs))
        return {m.id: self.format(m, p) for m, p in zip(models, probs, strict=True)}

    def predict(
        self, model_id: str, images: list[bytes], video: bool | None = None, threshold: float | None = None
    ) -> list[dict[str, Any]]:
        """One request on its own (the inference service goes through services.serving.batching.Batcher); images, or
        videos for a model trained on clips; `threshold` overrides a multi-label model's own."""
        model = self.load(model_id)
        model, x = self.inputs(model, self.decode_for(model, images, video))
        return self.format(model, self.run([(model, x)])[0], threshold)
