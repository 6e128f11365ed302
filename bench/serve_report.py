"""The serving benchmark's report (bench/serve.py): the table of its rows, the memory and /healthz figures, the targets'
verdicts and the `key=value` line."""

from __future__ import annotations

import argparse
import time

import common
import numpy as np
from common import fmt, median, spread

TARGETS = {"latency_ratio": 1.2, "multi_model_cost_ratio": 1.3, "health_p99_ms": 50.0, "http_overhead_ms": 3.0}
EXTRA_LOSA_OF_BACKBONE, EXTRA_MERGED_OF_BACKBONE = 0.1, 1.05


def report(args: argparse.Namespace, m: dict) -> None:
    import torch

    rows = m["rows"]
    names = list(rows)
    bare_p50 = median(rows[names[0]]["lat"])
    mem, health = m["memory"], m["health"]
    print(
        f"sidetune serve benchmark: {args.backbone} at {args.image_size} px ({m['params']:,} params, RANDOM INIT), "
        f"device {args.device}, serving dtype {mem['dtype'].removeprefix('torch.')}; {len(m['models'])} LoSA models "
        f"(rank {args.rank}, all layers, {len(m['classes'])} classes), each trained {args.epochs} epoch(s), and a LoRA "
        f"model (rank 8, every block, merged), by train_job from {args.train_images} digits, saved and registered as "
        "the train step does"
    )
    print(common.machine_line(args.load_start))
    print(
        f"services: `sidetune inference` and `sidetune api` (forwarding predict) in subprocesses with real Redis; "
        f"predict_max_batch {args.max_batch}, predict_max_wait_ms {args.max_wait_ms}; one 32x32 PNG digit per request "
        f"(JSON, base64); {args.repeats} interleaved rounds: latency percentiles over every round's requests, images/s "
        "median (rounds listed)"
    )
    print()
    table = []
    for name in names:
        lat = np.array(rows[name]["lat"]) * 1000
        table.append(
            [
                name,
                str(len(lat)),
                fmt(float(np.percentile(lat, 50)), 1),
                fmt(float(np.percentile(lat, 99)), 1),
                fmt(np.median(lat) / 1000 / bare_p50, 2),
                spread(rows[name]["rate"]),
                str(sum(rows[name]["failures"])),
            ]
        )
    for service, lat in health["latencies"].items():
        ms = np.array(lat) * 1000
        p50, p99 = (fmt(float(np.percentile(ms, q)), 1) for q in (50, 99))
        table.append(
            [f"/healthz of the {service} under {args.health_load} predicts", str(len(ms)), p50, p99, "", "", "0"]
        )
    micro_names = {"inprocess": "in process", "direct": "HTTP to inference", "api": "HTTP via the API"}
    for name, lat in m["micro"].items():
        ms = np.array(lat) * 1000
        p50, p99 = (fmt(float(np.percentile(ms, q)), 2) for q in (50, 99))
        table.append([f"micro model (test_vit, 1 thread): {micro_names[name]}", str(len(ms)), p50, p99, "", "", "0"])
    print(common.render(["row", "requests", "p50 ms", "p99 ms", "p50 / bare", "images/s", "failed"], table))
    print(f"(the load: {health['predicts']} predicts in {health['seconds']:.0f}s, {health['failed']} failed)")

    mb = 2**20
    backbone_mb = mem["backbone"] / mb
    print()
    memory_rows = [
        [name, fmt(delta / mb, 2), fmt(delta / mem["backbone"], 3)] for name, delta in mem["measured"].items()
    ]
    memory_rows.append([f"backbone tensors ({mem['dtype'].removeprefix('torch.')})", fmt(backbone_mb, 2), "1.000"])
    for model_id, nbytes in mem["models"].items():
        memory_rows.append(
            [f"{model_id}: own tensors (accounted)", fmt(nbytes / mb, 2), fmt(nbytes / mem["backbone"], 3)]
        )
    what = "allocated device memory" if args.device.startswith("cuda") else "resident set after gc + malloc_trim"
    print(common.render([f"memory ({what})", "MB", "/ backbone"], memory_rows))

    single, direct, one, many, off = names[2:7]
    latency_ratio = median(rows[single]["lat"]) / bare_p50
    rate_one, rate_many, rate_off = (median(rows[k]["rate"]) for k in (one, many, off))
    cost_ratio = common.ratio(rate_one, rate_many)
    health_p99 = max(float(np.percentile(v, 99)) * 1000 for v in health["latencies"].values())
    micro = {name: median(lat) * 1000 for name, lat in m["micro"].items()}
    http_overhead, api_hop = micro["direct"] - micro["inprocess"], micro["api"] - micro["direct"]
    extra_losa, extra_merged = mem["measured"]["extra LoSA"] / mb, mem["measured"]["extra merged"] / mb
    print()
    met = {
        "latency_ratio": latency_ratio <= TARGETS["latency_ratio"],
        "multi_model_cost_ratio": cost_ratio is not None and cost_ratio <= TARGETS["multi_model_cost_ratio"],
        "health_p99_ms": health_p99 <= TARGETS["health_p99_ms"],
        "extra_model_mb_losa": extra_losa <= EXTRA_LOSA_OF_BACKBONE * backbone_mb,
        "extra_model_mb_merged": extra_merged <= EXTRA_MERGED_OF_BACKBONE * backbone_mb,
        "http_overhead_ms": http_overhead <= TARGETS["http_overhead_ms"],
    }
    verdict = {k: "met" if v else "MISSED" for k, v in met.items()}
    print(
        f"targets: latency_ratio {fmt(latency_ratio, 3)} <= 1.2: {verdict['latency_ratio']}; multi_model_cost_ratio "
        f"{fmt(cost_ratio, 3)} <= 1.3: {verdict['multi_model_cost_ratio']}; health_p99_ms {fmt(health_p99, 1)} <= 50: "
        f"{verdict['health_p99_ms']}; extra_model_mb_losa {fmt(extra_losa, 2)} <= 0.1 x {fmt(backbone_mb, 1)}: "
        f"{verdict['extra_model_mb_losa']}; extra_model_mb_merged {fmt(extra_merged, 2)} <= 1.05 x "
        f"{fmt(backbone_mb, 1)}: {verdict['extra_model_mb_merged']}; batching gain ({args.concurrency} clients, "
        f"against predict_max_batch 1) {fmt(common.ratio(rate_one, rate_off), 2)}x; http_overhead_ms (micro model) "
        f"{fmt(http_overhead, 2)} <= 3: {verdict['http_overhead_ms']}, the API's hop {fmt(api_hop, 2)} ms more"
    )
    kv: dict[str, str] = {}
    for key, value, digits in [
        ("latency_ratio", latency_ratio, 3),
        ("multi_model_cost_ratio", cost_ratio, 3),
        ("health_p99_ms", health_p99, 1),
        ("extra_model_mb_losa", extra_losa, 2),
        ("extra_model_mb_merged", extra_merged, 2),
        ("http_overhead_ms", http_overhead, 2),
        ("api_hop_ms", api_hop, 2),
        ("backbone_mb", backbone_mb, 2),
        ("bare_ms", bare_p50 * 1000, 2),
        ("predict_p50_ms", median(rows[single]["lat"]) * 1000, 2),
        ("predict_p99_ms", float(np.percentile(rows[single]["lat"], 99)) * 1000, 2),
        ("direct_p50_ms", median(rows[direct]["lat"]) * 1000, 2),
        ("inprocess_p50_ms", median(rows[names[1]]["lat"]) * 1000, 2),
        ("load_p50_ms", median(rows[one]["lat"]) * 1000, 1),
        ("load_p99_ms", float(np.percentile(rows[one]["lat"], 99)) * 1000, 1),
        ("img_s_1_model", rate_one, 2),
        ("img_s_multi_models", rate_many, 2),
        ("img_s_batching_off", rate_off, 2),
        ("batching_gain", common.ratio(rate_one, rate_off), 2),
    ]:
        common.put(kv, key, value, digits)
    kv |= {
        "targets_met": ",".join(k for k, v in met.items() if v) or "none",
        "targets_missed": ",".join(k for k, v in met.items() if not v) or "none",
        "failed": str(sum(sum(r["failures"]) for r in rows.values()) + health["failed"]),
        "models": str(len(m["models"])),
        "concurrency": str(args.concurrency),
        "requests": str(args.requests),
        "health_load": str(args.health_load),
        "backbone": args.backbone,
        "image_size": str(args.image_size),
        "device": args.device,
        "dtype": mem["dtype"].removeprefix("torch."),
        "torch_threads": str(torch.get_num_threads()),
        "wall_s": f"{time.perf_counter() - args.t_start:.0f}",
    }
    common.print_kv(kv)
