"""bench/cache.py, part (d): what each codec costs in accuracy on the digits transfer task. LoSA is trained from every
codec's entry of part (a) (same spec, seed and epochs; only the cached bytes differ) and its validation accuracy is
compared with the codec-none entry's. Lossless codecs must match it exactly; BitRound's loss shows here.
"""

from __future__ import annotations

import argparse
from typing import Any

from cache_extract import EXTRACT_ROWS, job_spec, settings_for
from cache_training import checkpoint
from common import fmt, render, say, train_fresh


def measure(args: argparse.Namespace, extraction: dict[str, Any]) -> dict[str, Any]:
    """Best val accuracy of LoSA trained `--codec-epochs` from each LoSA entry of part (a)."""
    out: dict[str, Any] = {}
    for name, dataset, method, codec, keepbits in EXTRACT_ROWS:
        if method != "losa" or dataset != "digits":
            continue
        key = extraction["ext"][name][-1]["cache_key"]
        spec = job_spec(args, "losa", codec=codec, keepbits=keepbits, epochs=args.codec_epochs)
        result, _ = train_fresh(spec, settings_for(args, name), key, checkpoint(args, f"codec {name}"))
        out[name] = result["metrics"]
        say(f"(d) {name}: val acc {out[name]['val_accuracy']:.4f} after {args.codec_epochs} epochs")
    return out


def report(args: argparse.Namespace, d: dict[str, Any], extraction: dict[str, Any]) -> dict[str, str]:
    """Prints part (d); returns `key=value` pairs (accuracy and its change against codec none, per codec)."""
    base = d["losa none"]
    n_val = base.get("val_images")
    print(
        f"(d) codec cost in accuracy: LoSA (rank {args.rank}, all layers) trained {args.codec_epochs} epochs from each "
        f"codec's entry (same spec and seed), validation accuracy on {n_val or 'the'} held-out digits "
        "(random-init backbone: absolute accuracy is low, the change against codec none is the figure)"
    )
    headers = ["codec", "bytes/image", "best val acc", "vs none"]
    rows, kv = [], {}
    for name, metrics in d.items():
        delta = metrics["val_accuracy"] - base["val_accuracy"]
        bpi = extraction["ext"][name][-1]["bytes_per_image"]
        rows.append([name, f"{bpi:,}", fmt(metrics["val_accuracy"], 4), f"{delta:+.4f}"])
        slug = name.replace("losa ", "").replace("+", "_")
        kv[f"codec_acc_{slug}"] = f"{metrics['val_accuracy']:.4f}"
        kv[f"codec_acc_delta_{slug}"] = f"{delta:+.4f}"
    print(render(headers, rows, left=1))
    return kv
