"""Bringing the data where it lives (issue 22's targets), in one run:

1. `POST /jobs` on a CSV manifest of `--rows` distinct files (1,000,000 by default): post_jobs.py's measurement, the
   API under uvicorn on an embedded Redis, no worker;
2. planning that manifest as the extract worker does (services/jobs/planning.py: `plan_step`, reading every row,
   checking and stating every file, the split, the fingerprint, the cache plan), in a child process: its seconds
   (wall and CPU) and its peak resident memory (the kernel's high-water mark of the whole process, imports included);
   and as many items in the other formats, each planned likewise: the same files as an ImageFolder (the manifest's
   folders of 1,000 files as its classes), WebDataset shards of 1,000 samples, and a Hugging Face dataset of 10
   Parquet shards (tiny images; where `datasets` is installed);
3. extraction of the same `--images` photos (bench/photos.py) from a local ImageFolder and from WebDataset shards in
   an S3-compatible store (moto in server mode, on loopback), same model, `--rounds` interleaved rounds, the fastest of
   each: images/s, whole (reading the dataset, listing the shards, included) and of the batches alone, and the
   requests the store answered;
4. the same photos through every source (ImageFolder, CSV, JSONL, WebDataset local and on S3, a CSV manifest of the
   photos' S3 URLs, and Hugging Face Parquet, local and on S3, and `save_to_disk`, where `datasets` is installed):
   each source's cache entry bit-equal to the ImageFolder's (activations, labels, valid rows), with the GET
   requests the store answered for each source on S3.

    python bench/sources.py [--rows 1000000] [--images 512] [--rounds 3]
    python bench/sources.py --smoke      # 2,000 rows, 24 photos, test_vit at 32 px, one round

Ends with `post_jobs_ms=<median> plan_peak_mb=<MiB> plan_s=<s> wds_s3_vs_local=<ratio> sources_equal=0|1` (the
issue's targets: under 200 ms, under 1 GB, reported, at least 0.9, 1), then `plan_peak_mb_<format>=` and
`plan_s_<format>=` for `imagefolder`, `wds` and `hf` (`nan` where not measured).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import child_result, fmt, parse_with_smoke, print_kv, put, render, run_child, say, workdir
from sources_data import (
    BUCKET,
    many_folder,
    moto_server,
    upload_shards,
    upload_sources,
    write_formats,
    write_many,
    write_many_parquet,
    write_many_shards,
)

KIB = 1024


def plan_child(dataset: str, root: Path, work: Path) -> None:
    """In a child process: the plan step of a job on `dataset` (its `dataset.path`, under the allowed `root`), on an
    embedded Redis; prints its figures."""
    from services.jobs.planning import plan_step
    from services.spec import JobSpec
    from storage.redis import JobStore
    from storage.redis_server import RedisServer
    from storage.settings import Settings
    from worker.launcher import free_port

    redis = RedisServer(work / "redis", free_port()).start()
    try:
        settings = Settings(data_dir=work, redis_url=redis.url, allowed_roots=[root])
        store = JobStore.from_url(settings.broker_url)
        body = {
            "dataset": {"path": dataset},
            "backbone": {"name": "vit_base_patch16_224", "pretrained": False},
            "method": {"name": "linear"},
        }
        job = store.create_job(JobSpec.model_validate(body).model_dump(mode="json"), status="planning")
        base_mb = _peak_mb()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        plan_step(store, settings, job["id"])
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        record = store.get_job(job["id"])
    finally:
        redis.stop()
    if record["status"] != "queued":
        raise RuntimeError(f"the plan step left the job {record['status']}: {record.get('error')}")
    child_result(
        {
            "seconds": wall,
            "cpu_s": cpu,
            "peak_mb": _peak_mb(),
            "base_mb": base_mb,
            "images": record["resolved"]["images"],
        }
    )


def _peak_mb() -> float:
    """This process's peak resident memory: the kernel's high-water mark of its own memory (VmHWM; ru_maxrss, where
    there is none, starts at the parent's peak: Linux keeps it across exec, so a child of a large parent would read
    the parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / KIB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB


def plan(dataset: str, root: Path, work: Path, rows: int) -> dict[str, Any]:
    """The plan child's figures on `dataset` (under the allowed `root`)."""
    say(f"planning {dataset} ({rows:,} items) in a child process")
    shutil.rmtree(work / "plan", ignore_errors=True)
    out = run_child(__file__, ["--plan-child", dataset, str(root), str(work / "plan")])
    if "error" in out:
        raise RuntimeError(f"the plan child failed on {dataset}: {out['error']}\n" + "\n".join(out["log"]))
    return out


def many_formats(work: Path, args: argparse.Namespace) -> dict[str, tuple[str, Path]]:
    """The datasets of `args.rows` items planned besides the manifest: {name: (dataset.path, its allowed root)}."""
    many = work / "datasets" / "many"
    out = {"imagefolder": (str(many_folder(many / "rows.csv")), many)}
    out["wds"] = (write_many_shards(work / "datasets" / "many-wds", args.rows), work / "datasets" / "many-wds")
    try:
        import datasets  # noqa: F401 - only whether it is installed
    except ImportError:
        say("no `datasets` installed: planning a Hugging Face dataset is left out")
        return out
    hf = write_many_parquet(work / "datasets" / "many-hf", args.rows)
    return out | {"hf": (str(hf), hf)}


def post_jobs(manifest: Path, work: Path, repeats: int) -> list[float]:
    """Milliseconds of each `POST /jobs` on `manifest` (post_jobs.py's measurement)."""
    from post_jobs import serve, submit_times

    from api.main import create_app
    from storage.redis_server import RedisServer
    from storage.settings import Settings
    from worker.launcher import free_port

    redis = RedisServer(work / "redis", free_port()).start()
    try:
        settings = Settings(data_dir=work, redis_url=redis.url, allowed_roots=[manifest.parent])
        url, server, thread = serve(create_app(settings))
        try:
            return [t * 1000 for t in submit_times(url, manifest, repeats)]
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        redis.stop()


def extraction_spec(path: str, args: argparse.Namespace):
    from services.spec import JobSpec

    return JobSpec.model_validate(
        {
            "dataset": {"path": path},
            "backbone": {"name": args.backbone, "pretrained": False, "image_size": args.image_size},
            "method": {"name": "linear"},
            "extraction": {"batch_size": args.batch_size},
        }
    )


def _requests(log: Path) -> int:
    """GET requests the store answered so far (moto logs one line each)."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if f"GET /{BUCKET}/" in line)


def extract_all(sources: dict[str, str], args: argparse.Namespace, bucket: str, log: Path) -> dict[str, Any]:
    """Each source extracted `args.rounds` times, the order rotated each round: {source: [run, ...]} (a run:
    run_extraction's answer, its settings and the store's requests during it)."""
    from common import make_settings

    from services.extraction import run_extraction
    from services.jobs.progress import NullReporter

    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    names = list(sources)
    warm = make_settings(args.work / "runs" / "warm-up", args.work, args.device)
    run_extraction(extraction_spec(sources["imagefolder"], args), warm, NullReporter())  # imports, first forwards
    pair, rest = ["imagefolder", "wds s3"], [n for n in names if n not in ("imagefolder", "wds s3")]
    for rnd in range(args.rounds):
        say(f"extraction, round {rnd + 1}/{args.rounds}")
        # the target's two side by side, either first in turn: a shared machine's load drifts over minutes
        order = (pair if rnd % 2 == 0 else pair[::-1]) + rest[rnd % len(rest) :] + rest[: rnd % len(rest)]
        for name in order:
            settings = make_settings(args.work / "runs" / f"{name.replace(' ', '-')}-{rnd}", args.work, args.device)
            settings = settings.model_copy(update={"allowed_prefixes": [bucket]})
            before = _requests(log)
            out = run_extraction(extraction_spec(sources[name], args), settings, NullReporter())
            runs[name].append({**out, "settings": settings, "requests": _requests(log) - before})
    return runs


def same_entries(runs: dict[str, list[dict[str, Any]]]) -> dict[str, bool]:
    """Whether each source's first entry is bit-equal to the ImageFolder's (activations, labels, valid rows)."""
    import numpy as np

    from storage.cache import FeatureCache

    def entry(run: dict[str, Any]):
        return FeatureCache(run["settings"].cache_location).entry(run["cache_key"])

    want = entry(runs["imagefolder"][0])
    out = {}
    for name, rows in runs.items():
        got = entry(rows[0])
        out[name] = bool(
            got.is_complete
            and np.array_equal(got.read(), want.read())
            and np.array_equal(got.labels(), want.labels())
            and np.array_equal(got.valid(), want.valid())
        )
    return out


def sources_table(runs: dict[str, list[dict[str, Any]]], equal: dict[str, bool]) -> tuple[str, float | None]:
    """The extraction table, and WebDataset-on-S3's whole rate over the ImageFolder's. Each source's figure is its
    fastest round: on a shared machine a run is only ever slowed by others' load, never sped up, so the fastest is the
    closest to what the source itself costs (timeit's reasoning); medians of rounds there measured the load."""
    whole = {n: max(r["images"] / r["extract_seconds"] for r in rows) for n, rows in runs.items()}
    loop = {n: max(r["extract_images_per_s"] for r in rows) for n, rows in runs.items()}
    rows = []
    for name, rs in runs.items():
        requests = statistics.median(r["requests"] for r in rs)
        rows.append(
            [
                name,
                str(rs[0]["images"]),
                fmt(min(r["extract_seconds"] for r in rs), 2),
                fmt(whole[name]),
                fmt(loop[name]),
                fmt(whole[name] / whole["imagefolder"], 2),
                fmt(requests, 0) if name.endswith(" s3") else "-",
                "yes" if equal[name] else "NO",
            ]
        )
    headers = ["source", "images", "best s", "img/s whole", "img/s batches", "vs folder", "GETs", "bit-equal"]
    return render(headers, rows), whole["wds s3"] / whole["imagefolder"]


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--plan-child":
        plan_child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows (distinct files) of the manifest planned")
    p.add_argument("--repeats", type=int, default=20, help="POST /jobs timed")
    p.add_argument("--images", type=int, default=512, help="photos extracted from every source")
    p.add_argument("--per-shard", type=int, default=128, help="samples per WebDataset shard")
    p.add_argument("--rounds", type=int, default=3, help="interleaved extraction rounds (the fastest reported)")
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT, random init")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32, help="extraction.batch_size")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", help="working dir (default: a temporary dir, removed after); the manifest is kept")
    smoke = {"rows": 2000, "repeats": 3, "images": 24, "per_shard": 10, "rounds": 1, "backbone": "test_vit"}
    args = parse_with_smoke(p, argv, smoke | {"image_size": 32, "batch_size": 8})
    with workdir(args.data_dir, "sidetune-sources-") as work:
        args.work = work
        for old in ("runs", "post", "plan"):  # a kept --data-dir's: entries there would be reused, not extracted
            shutil.rmtree(work / old, ignore_errors=True)
        manifest = write_many(work / "datasets" / "many", args.rows)
        say(f"POST /jobs x {args.repeats} on {args.rows:,} rows")
        ms = post_jobs(manifest, work / "post", args.repeats)
        plans = {"csv": plan(str(manifest), manifest.parent, work, args.rows)}
        plans |= {name: plan(path, root, work, args.rows) for name, (path, root) in many_formats(work, args).items()}
        from photos import write_photos

        base = work / "datasets" / "photos"
        folder = write_photos(base / "train", n=args.images, classes=4)
        sources = write_formats(base, folder, args.per_shard)
        log = work / "moto.log"
        with moto_server(log) as bucket:
            first = {"imagefolder": sources["imagefolder"], "wds local": sources["wds local"]}
            stored = {"wds s3": upload_shards(sources["wds local"], bucket)} | upload_sources(sources, base, bucket)
            sources = first | stored | sources
            runs = extract_all(sources, args, bucket, log)
        equal = same_entries(runs)
    heads = ["rows", "POST /jobs ms", "max ms"]
    print(render(heads, [[f"{args.rows:,}", fmt(statistics.median(ms)), fmt(max(ms))]]))
    print()
    plan_rows = [
        [name, f"{p['images']:,}", fmt(p["seconds"], 2), fmt(p["cpu_s"], 2), fmt(p["peak_mb"]), fmt(p["base_mb"])]
        for name, p in plans.items()
    ]
    heads = ["planned", "items", "plan s", "plan CPU s", "plan peak MiB", "after imports MiB"]
    print(render(heads, plan_rows))
    print()
    table, ratio = sources_table(runs, equal)
    print(
        f"extraction: {args.images} photos, {args.backbone} at {args.image_size} px on {args.device}, the fastest of "
        f"{args.rounds} round(s); whole = run_extraction (dataset read, shards listed), batches = its loop"
    )
    print(table)
    kv: dict[str, str] = {}
    put(kv, "post_jobs_ms", statistics.median(ms), 1)
    put(kv, "plan_peak_mb", plans["csv"]["peak_mb"], 1)
    put(kv, "plan_s", plans["csv"]["seconds"], 2)
    put(kv, "wds_s3_vs_local", ratio, 3)
    kv["sources_equal"] = str(int(all(equal.values())))
    for name in ("imagefolder", "wds", "hf"):
        put(kv, f"plan_peak_mb_{name}", plans[name]["peak_mb"] if name in plans else None, 1)
        put(kv, f"plan_s_{name}", plans[name]["seconds"] if name in plans else None, 2)
    print_kv(kv)


if __name__ == "__main__":
    main()
