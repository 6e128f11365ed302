"""The soak: the `sidetune serve` topology as processes (embedded Redis, extract worker, train worker, inference
service, API; worker.launcher.Stack, supervised), jobs and predicts kept flowing through its HTTP API for
`--minutes`, processes optionally killed on a schedule, and every process's RSS and open file descriptors sampled
(psutil) every `--sample-s` seconds, following a restarted process by its role. Not in CI
(tests/bench/test_soak_bench.py runs it for seconds).

    python bench/soak.py --minutes 60                 # the hour: six 10-minute windows
    python bench/soak.py --minutes 60 --kill-every 10  # and one process SIGKILLed every 10 minutes, in turn
    python bench/soak.py --smoke                      # 15 seconds, one kill (the smoke test)

The load: one job at a time, alternating a linear probe from the feature cache (its backbone seed cycles through
`--seeds` values, and the cache quota holds fewer entries than that, so every job extracts and evicts as well) and a
LoSA job in online mode (the backbone runs in the train worker); finished jobs beyond the last three are deleted with
their models. Predicts: `--predict-rate` requests a second over the API, v1 (base64 images) and v2 (JSON and binary
tensors) in turn, on the models kept.

The report: per window, each process's RSS (the median of the window's second half: the first half of the first
window is warm-up) and open descriptors, their growth over the first window, and the RSS growth from the second
window to the last (whether it still grows after the warm-up). It passes when no process's RSS in any later window is
more than `--bound-pct` (or `--rss-slack-mb`, whichever is more) above its first window's and no process holds more
than `--bound-pct` (or `--fd-slack`, whichever is more) more descriptors. The last line is `key=value` pairs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import fmt, parse_with_smoke, print_kv, put, render, say, workdir
from soak_load import ROLES, Killer, Load, Sample, Sampler, linear_cache_bytes

from storage.settings import Settings
from worker.launcher import Stack, free_port


def windows(samples: list[Sample], window_s: float, count: int) -> dict[str, list[dict]]:
    """Per role, per window: the median RSS and descriptors of the window's second half, its pids and children."""
    out: dict[str, list[dict]] = {}
    for role in ROLES:
        rows = []
        for w in range(count):
            start, end = w * window_s, (w + 1) * window_s
            mine = [s for s in samples if s.role == role and start <= s.t < end]
            settled = [s for s in mine if s.t >= start + window_s / 2] or mine
            if not settled:
                rows.append({})
                continue
            rows.append(
                {
                    "rss": statistics.median(s.rss for s in settled),
                    "fds": statistics.median(s.fds for s in settled),
                    "children": max(s.children for s in mine),
                    "pids": sorted({s.pid for s in mine}),
                }
            )
        out[role] = rows
    return out


def _pct(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def report(per_role: dict[str, list[dict]], args: argparse.Namespace, load: Load, kills: list) -> dict[str, str]:
    """Prints the table, the load's counts and the verdict; returns the `key=value` pairs."""
    count = len(per_role[ROLES[0]])
    headers = [
        "process",
        *(f"w{w + 1} RSS MB" for w in range(count)),
        "max growth %",
        "w2 to last %",
        "fds w1",
        "fds last",
        "children last",
        "pids",
    ]
    rows, failures = [], []
    worst_rss, worst_fd = (0.0, "none"), (0.0, "none")
    for role, ws in per_role.items():
        seen = [w for w in ws if w]
        if not ws[0] or not seen:
            continue
        base, last = ws[0], seen[-1]
        most = max((_pct(w["rss"], base["rss"]) for w in seen[1:]), default=0.0)
        later = _pct(last["rss"], seen[1]["rss"]) if len(seen) > 2 else 0.0  # after the warm-up: still growing?
        fd_most = max((w["fds"] - base["fds"] for w in seen[1:]), default=0.0)
        cells = [
            f"{w['rss'] / 2**20:,.1f}" + (f" ({_pct(w['rss'], base['rss']):+.1f}%)" if i else "") if w else "-"
            for i, w in enumerate(ws)
        ]
        pids = {p for w in seen for p in w["pids"]}
        rows.append(
            [
                role,
                *cells,
                fmt(most),
                fmt(later),
                fmt(base["fds"], 0),
                fmt(last["fds"], 0),
                str(last["children"]),
                str(len(pids)),
            ]
        )
        worst_rss, worst_fd = max(worst_rss, (most, role)), max(worst_fd, (fd_most, role))
        if most > args.bound_pct and max(w["rss"] - base["rss"] for w in seen) > args.rss_slack_mb * 2**20:
            failures.append(f"{role} RSS grew {most:.1f}%")
        if fd_most > max(args.bound_pct / 100 * base["fds"], args.fd_slack):
            failures.append(f"{role} holds {fd_most:.0f} more descriptors")
    print(render(headers, rows))
    print(
        f"RSS and descriptors: the median of each window's second half ({args.window_minutes:g} min windows); "
        f"growth against window 1. Jobs: {dict(load.jobs)}. Predicts by status: {dict(load.predicts)}. Kills "
        f"(minute, process): {[(round(t / 60, 1), role) for t, role, _ in kills]}."
    )
    for line in load.errors[:10]:
        print(f"  {line}")
    verdict = (
        f"every process within max({args.bound_pct:g}%, {args.rss_slack_mb:g} MB) RSS and "
        f"max({args.bound_pct:g}%, {args.fd_slack}) descriptors of its first window"
    )
    print(f"PASS: {verdict}" if not failures else f"FAIL: {verdict}: not so for {'; '.join(failures)}")
    kv = {"minutes": f"{args.minutes:g}", "windows": str(count)}
    put(kv, "max_rss_growth_pct", worst_rss[0], 2)
    kv["max_rss_growth_process"] = worst_rss[1]
    put(kv, "max_fd_growth", worst_fd[0], 0)
    kv |= {
        "jobs_succeeded": str(load.jobs["succeeded"]),
        "jobs_failed": str(load.jobs["failed"]),
        "predicts": str(sum(load.predicts.values())),
        "predict_5xx": str(sum(n for code, n in load.predicts.items() if code.startswith("5"))),
        "predict_500": str(load.predicts["500"]),  # 503 with Retry-After is the answer while a process restarts
        "kills": str(len(kills)),
        "pass": str(int(not failures)),
    }
    return kv


# --smoke: 15 seconds in three windows, one kill, timm's 6-block test ViT on 40 digits; windows of 5 seconds say
# nothing about growth, so the bound is wide
SMOKE = {
    "minutes": 0.24,
    "window_minutes": 0.08,
    "sample_s": 1.0,
    "kill_every": 0.12,
    "backbone": "test_vit",
    "image_size": 0,
    "images": 40,
    "bound_pct": 1000.0,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="how long the load runs")
    p.add_argument("--window-minutes", type=float, default=10.0, help="report window")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--kill-every", type=float, default=0.0, help="minutes between kills (0: none)")
    p.add_argument("--bound-pct", type=float, default=5.0, help="most RSS growth over the first window, percent")
    p.add_argument(
        "--rss-slack-mb",
        type=float,
        default=5.0,
        help="RSS a process may gain whatever the percentage (Redis's is about 5 MB: a percentage of it is noise)",
    )
    p.add_argument("--fd-slack", type=int, default=10, help="descriptors a process may gain whatever the percentage")
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm ViT, random init")
    p.add_argument("--image-size", type=int, default=48, help="input size (0: the backbone's)")
    p.add_argument("--images", type=int, default=200, help="digits written (a tenth held out for predicts)")
    p.add_argument("--seeds", type=int, default=3, help="backbone seeds the linear probes cycle through")
    p.add_argument("--predict-rate", type=float, default=2.0, help="predict requests a second")
    p.add_argument("--data-dir", help="working dir (default: a temporary one, removed)")
    args = parse_with_smoke(p, argv, SMOKE)
    window_s, count = args.window_minutes * 60, max(1, round(args.minutes / args.window_minutes))

    with workdir(args.data_dir, "sidetune-soak-") as work:
        data, images_root = work / "data", work / "images"
        data.mkdir(exist_ok=True)
        from services.data.digits import write_digits

        write_digits(images_root, limit=args.images)
        train = images_root / "train"
        held_out = [path.read_bytes() for path in sorted((images_root / "holdout").glob("*/*.png"))]
        quota_gb = 2.5 * linear_cache_bytes(train, args, data) / 1e9  # fewer entries than seeds: evictions
        settings = Settings(
            data_dir=data,
            allowed_roots=[images_root],
            embedded_redis_port=free_port(),
            api_port=free_port(),
            inference_port=free_port(),
            device="cpu",
            cache_quota_gb=quota_gb,
        )
        say(f"starting the stack in {data} (cache quota {quota_gb * 1e9 / 1e3:.0f} kB)")
        with Stack(settings) as stack, Load(stack.api_url, args, train, held_out) as load:
            sampler, killer = Sampler(stack), Killer(stack, args.kill_every * 60)
            start = time.monotonic()
            say(f"soaking for {args.minutes:g} min: windows of {args.window_minutes:g} min")
            while (t := time.monotonic() - start) < count * window_s:
                sampler.sample(t)
                killer.tick(t, sampler.pids())
                time.sleep(max(0.0, args.sample_s - (time.monotonic() - start - t)))
        kv = report(windows(sampler.samples, window_s, count), args, load, killer.kills)
    print_kv(kv)
    return 0 if kv["pass"] == "1" else 1


if __name__ == "__main__":
    sys.exit(main())
