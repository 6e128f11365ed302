"""One row of bench/methods.py (a method in one execution mode), run in its own process so that its peak memory is
its own: the job spec, training, inference timing; and the bare-backbone reference that the rows are compared with.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from common import PeakRSS, digits_dir, make_settings, median, sync, train_fresh

TAIL_BLOCKS = 2

# `--hp short` (the default without pretrained weights). The papers' settings are tuned for pretrained backbones
# and ~100 epochs; on a random-init backbone trained for 3 epochs, APLA's lr 1e-4 and full fine-tuning's 5e-5 leave
# even the new classifier near chance, and ARC's 10 warmup epochs never reach its peak lr. One explicit lr per
# method family instead, each with 1 warmup epoch and the method's own optimizer family (AdamW) and weight decay:
# - side networks (linear, losa): their papers' settings, unchanged (they learn in a few epochs);
# - parameter-efficient adapters (apla, arc, lora): AdamW lr 3e-3 (on vit_tiny at 112 px, 3 epochs, 432 digits:
#   1e-3 leaves apla/arc near chance, 1e-2 makes lora diverge);
# - full fine-tuning: AdamW lr 3e-4 (1e-3 diverges; every weight moves, so 10x below the adapters).
SHORT = {
    "apla": {"optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1.0},
    "arc": {"optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1.0},
    "lora": {"optimizer": "adamw", "lr": 3e-3, "warmup_epochs": 1.0},
    "full": {"optimizer": "adamw", "lr": 3e-4, "warmup_epochs": 1.0},
}
SHORT_TEXT = (
    "linear and losa keep their papers' settings; apla, arc and lora use AdamW lr 3e-3 and full AdamW lr 3e-4, "
    "each with 1 warmup epoch and its own weight decay (the papers' lrs, tuned for pretrained backbones and ~100 "
    "epochs, leave a random-init model near chance in a few epochs)"
)


def make_spec(args: argparse.Namespace, method: str, mode: str):
    from services.spec import JobSpec

    short = dict(SHORT.get(method, {})) if args.hp == "short" else {}
    return JobSpec.model_validate(
        {
            "name": f"bench-{method}-{mode}",
            "dataset": {"path": str(digits_dir(args.data_dir))},
            "backbone": {"name": args.backbone, "pretrained": args.pretrained, "image_size": args.image_size},
            "method": {"name": method},
            "execution": {"mode": mode, "tail_blocks": TAIL_BLOCKS},
            "extraction": {"batch_size": args.batch_size},
            "training": {
                "epochs": 1 if args.memory_pass else args.epochs,
                "batch_size": args.batch_size,
                "seed": 0,
                **short,
            },
        }
    )


def settings(args: argparse.Namespace):
    return make_settings(args.data_dir, args.data_dir, args.device, args.train_memory_mb)


def infer_batches(args: argparse.Namespace) -> list[list[bytes]]:
    """Warm-up and timed batches of `--infer-batch` held-out digits as PNG bytes (as a client sends them), cycling
    through the held-out images."""
    paths = sorted(digits_dir(args.data_dir, split="holdout").glob("*/*.png"))
    images = [p.read_bytes() for p in paths]
    size, count = args.infer_batch, args.warmup + args.infer_batches
    return [[images[(k * size + i) % len(images)] for i in range(size)] for k in range(count)]


def median_rate(fn: Any, batches: list[Any], device: str) -> float:
    """Images/s of `fn` over `batches`, the median of per-call rates (robust to other load on a shared machine)."""
    rates = []
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        fn(batch)
        sync(device)
        rates.append(len(batch) / (time.perf_counter() - t0))
    return median(rates)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Train one METHOD/MODE (`--one`), then time its inference. With `--memory-pass`: one epoch for the peak
    memory only (the parent sets MEMORY_ENV), no inference."""
    from services.serving.inference import Predictor
    from storage.artifacts import ArtifactStore

    method, mode = args.one.split("/")
    config = settings(args)
    device = config.torch_device()
    spec = make_spec(args, method, mode)
    batches = infer_batches(args)

    checkpoint = Path(args.data_dir) / "bench-checkpoints" / f"{method}-{mode}"

    with PeakRSS() as rss:
        out, inputs = train_fresh(spec, config, args.cache_key, checkpoint)
    m = out["metrics"]
    result = {"inputs": inputs, "rss_mb": round(rss.above_baseline_mb, 1)}
    if device.startswith("cuda"):
        # train_job resets the CUDA peak after building the model and its sources, right before the first step
        result["cuda_peak_mb"] = m["peak_memory_mb"]
    if args.memory_pass:
        return result

    model_id = f"bench-{method}-{mode}"
    ArtifactStore.from_settings(config).save_model(model_id, out["weights"], out["manifest"], m)
    del out
    predictor = Predictor(config)
    for batch in batches[: args.warmup]:  # loads the backbone and the (merged) model, warms the allocator
        predictor.predict(model_id, batch)
    infer_rate = median_rate(lambda batch: predictor.predict(model_id, batch), batches[args.warmup :], device)
    hp = spec.training.resolved(spec.method.training_defaults())
    return result | {
        "side_params": m["side_params"],
        "classifier_params": m["trainable_params"] - m["side_params"],
        "train_images_per_s": m["train_images_per_s"],
        "val_accuracy": m["val_accuracy"],
        "infer_images_per_s": round(infer_rate, 2),
        "hyperparameters": {k: getattr(hp, k) for k in ("optimizer", "lr", "weight_decay", "warmup_epochs")},
    }


def bare_backbone(args: argparse.Namespace) -> dict[str, Any]:
    """The references for inference, on batches of the predict calls' size: the bare backbone forward (fp32, no
    head) on ready tensors, and the same from PNG bytes (decode, transform, forward: predict's work minus the
    head or side network)."""
    import torch

    from services.backbones import load_backbone
    from services.data.datasets import load_image
    from services.spec import BackboneSpec

    device = settings(args).torch_device()
    spec = BackboneSpec(name=args.backbone, pretrained=args.pretrained, image_size=args.image_size)
    backbone = load_backbone(spec, device)
    batches = infer_batches(args)

    def tensors(batch: list[bytes]) -> torch.Tensor:
        return torch.stack([backbone.transform(load_image(b)) for b in batch]).to(device, backbone.dtype)

    xs = [tensors(b) for b in batches]
    with torch.inference_mode():
        for x in xs[: args.warmup]:
            backbone.model(x)
        forward = median_rate(backbone.model, xs[args.warmup :], device)
        from_png = median_rate(lambda batch: backbone.model(tensors(batch)), batches[args.warmup :], device)
    out = {
        "forward_images_per_s": round(forward, 1),
        "png_forward_images_per_s": round(from_png, 1),
        "backbone_params": sum(p.numel() for p in backbone.model.parameters()),
        "tokens": backbone.tokens,
        "dim": backbone.dim,
        "num_layers": backbone.num_layers,
    }
    xs.clear()
    backbone.model.to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out
