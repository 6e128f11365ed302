"""The method registry: one package per method under services/methods/<name>/, found by discovery.

Each package exports `Config` (a torch-free pydantic model whose `name` field is the method's name) from its
`__init__.py`, and a `model.py` with `build(...) -> nn.Module`. Adding a method touches one folder. A config
says its `kind` and `modes` (class variables; the first mode is the default):
- kind "side" (linear, losa): `build(config, info: FeatureInfo)`, a `readout.Classifier` fed backbone
  activations, from the cache (`cache`) or from a backbone forward every step (`online`);
- kind "adapted" (apla, arc, lora, full): `build(config, vit, num_classes, tail_blocks)`, an
  `adapted.AdaptedViT` trained through the backbone on images (`images`) or on its last blocks (`tail`).
The configs form the discriminated union that the API validates jobs against; `model.py` (torch) is imported
only by the workers and the inference routes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field

from services.methods.auto import AutoConfig


def _discover() -> dict[str, type[BaseModel]]:
    configs: dict[str, type[BaseModel]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.ispkg:
            config = importlib.import_module(f"{__name__}.{info.name}").Config
            configs[config.model_fields["name"].default] = config
    return configs


CONFIGS = _discover()
METHOD_NAMES = tuple(sorted(CONFIGS))
# `auto` (services/methods/auto.py) chooses between two methods; it has no model, so it is a job's method only
MethodConfig = Annotated[Union[(*CONFIGS.values(), AutoConfig)], Field(discriminator="name")]  # noqa: UP007


def build(config: BaseModel, *args: Any):
    """Build the trainable module for `config` (imports torch); the arguments depend on the method's kind."""
    return importlib.import_module(f"{__name__}.{config.name}.model").build(config, *args)
