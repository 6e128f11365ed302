"""Linear probe: a classifier on the frozen backbone's final representation (after the final norm).

The standard baseline of every adaptation paper (e.g. LoSA, Mercea et al., CVPR 2024, Table 1).
Trained from the feature cache; needs only the last layer. In cache mode the default solver is full-batch L-BFGS
on standardised features (the optimum of the convex problem, as scikit-learn's LogisticRegression finds it;
services/training/lbfgs.py) by the standard protocol: the L2 strength chosen from a grid by stratified k-fold
cross-validation over the training and validation images (by the validation split for large jobs), then the model
refitted on all of them at that strength (scikit-learn's GridSearchCV(refit=True); the CLIP linear-probe protocol,
Radford et al. 2021, App. A.3, whose final fit also uses the validation images). The standardisation is folded into
the saved classifier.
"""

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.methods.defaults import TrainingDefaults

Pool = Literal["auto", "cls", "mean"]


class LinearConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "side"  # trained on backbone activations; build(config, info: FeatureInfo)
    modes: ClassVar[tuple[str, ...]] = ("cache", "online")  # the first is the default

    name: Literal["linear"] = Field("linear", description="Method name: a linear probe.")
    pool: Pool = Field(
        "auto",
        description="Token pooling before the classifier: `cls` (class token), `mean` (mean of patch tokens), "
        "or `auto` (the backbone's own pooling).",
    )

    solver: Literal["auto", "lbfgs", "sgd"] = Field(
        "auto",
        description="`lbfgs`: full-batch L-BFGS (strong Wolfe line search) on standardised features, solved to "
        "convergence for each L2 strength of a grid (`training.weight_decay` `auto`, or the values of "
        "`sweep.weight_decay`; an explicit `training.weight_decay` is the one strength), the best chosen by "
        "cross-validation (`cv_folds`) and refitted on the training and validation images; `training.lr`, "
        "`epochs`, `batch_size` and `optimizer` do not apply. Cache mode only. `sgd`: "
        "mini-batch training with the `training` settings. `auto`: lbfgs in cache mode, sgd online.",
    )
    cv_folds: int = Field(
        5,
        ge=0,
        le=20,
        description="L-BFGS: folds of the stratified cross-validation (seeded by `dataset.split_seed`) that scores "
        "each L2 strength over the training and validation images together; the best is then refitted on all of "
        "them. Below 2: the strength is chosen on the validation split (still refitted on training and validation).",
    )
    cv_max_images: int = Field(
        50_000,
        ge=0,
        description="L-BFGS: above this many training and validation images the strength is chosen on the "
        "validation split instead of by cross-validation (k solves per strength), then refitted as well.",
    )
    max_iter: int = Field(
        1000, ge=1, le=100_000, description="L-BFGS: most iterations per L2 strength (scikit-learn's default is 100)."
    )

    def resolved_solver(self, mode: str) -> str:
        if self.solver == "lbfgs" and mode != "cache":
            raise ValueError("method.solver 'lbfgs' needs execution mode 'cache' (fixed features)")
        if self.solver != "auto":
            return self.solver
        return "lbfgs" if mode == "cache" else "sgd"

    def resolved_pool(self, global_pool: str) -> str:
        """`auto` -> the backbone's own pooling (`token` means the class token)."""
        if self.pool != "auto":
            return self.pool
        return "cls" if global_pool == "token" else "mean"

    def needs(self, num_layers: int, global_pool: str) -> tuple[list[int], tuple[str, ...]]:
        """The cached layers it reads and the token modes it accepts, smallest first: the last block's pooled
        token suffices, so a linear probe never forces a per-layer, per-token cache."""
        return [num_layers - 1], (self.resolved_pool(global_pool), "all")

    def training_defaults(self) -> TrainingDefaults:
        # The mini-batch (sgd) solver's settings; the L-BFGS solver uses only weight_decay (`auto`: its grid).
        return {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-4, "warmup_epochs": 1.0, "clip_grad_norm": None}
