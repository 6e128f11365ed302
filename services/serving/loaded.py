"""Loaded models for serving, and the cache that keeps them loaded (`ModelCache`, the Predictor's loading half:
services/serving/inference.py).

- Models are rebuilt from their artifacts by services/models/loading.py (`load_trained`, as the exporters do).
  Adapted models (APLA, ARC, LoRA, full) are merged into a plain ViT at load time, built on a float32 copy on the
  CPU (the method folds its weights as it did in training). The merged ViT then keeps only the tensors that differ
  from its backbone's, in the serving dtype: every other parameter IS the backbone's tensor, so a merged model costs
  what it changed and one backbone forward per image.
- One frozen backbone per (name, weights hash, preprocessing, precision) serves every model on it.
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
from itertools import chain
from typing import TypedDict

import torch

from services.backbones import PRECISIONS, Backbone, resolve_precision
from services.modality import modality_for
from services.models.loading import load_backbone_for, load_trained, read_artifact
from services.models.manifest import Manifest
from services.paths import UserPaths
from storage.artifacts import ArtifactStore
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
    """A model ready to serve: its module on the device, its manifest, and the backbone it shares."""

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
        self.modality = modality_for(manifest)  # how its inputs are checked, decoded and batched


class Memory(TypedDict):
    """What a `ModelCache` holds, in bytes: each model's own tensors, each shared backbone's, and all against the
    budget."""

    models: dict[str, int]  # by model id
    backbones: dict[str, int]  # by "<name>@<size>px:<weights hash>:<precision>"
    total: int
    budget: int


class ModelCache:
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

    def memory(self) -> Memory:
        """What is loaded and what it holds, in bytes."""
        with self._lock:
            backbones = {
                f"{b.spec.name}@{b.data_config['input_size'][-1]}px:{b.weights_hash[:8]}:{b.precision}": tensor_bytes(
                    b.model
                )
                for b in self._backbones.values()
            }
            return Memory(
                models={m.id: m.nbytes for m in self._models.values()},
                backbones=backbones,
                total=self.memory_used(),
                budget=self.memory_bytes,
            )

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
