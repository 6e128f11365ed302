"""What the benchmark scripts share: their working dir and digits, Settings, the child processes that rows run in,
peak-memory measurement, tables and the final `key=value` line, the machine note, and the arguments common to both.

Imported as `common` by bench/methods.py and bench/cache.py (run as scripts, bench/ is first on sys.path); importing
it puts the repository root on sys.path too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 2**20
# glibc keeps freed heap blocks for reuse, so a process's RSS is partly the allocator's high-water mark. With this
# in its environment a child maps every block >= 128 KiB on allocation and unmaps it on free, so its RSS follows the
# live tensors. It slows training (large allocations fault their pages in), so it is only set for memory runs.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CHILD_MARK = "BENCH_JSON "


def say(msg: str) -> None:
    """A progress line on stderr (stdout holds the report)."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- setup


@contextlib.contextmanager
def workdir(data_dir: str | None, prefix: str) -> Iterator[Path]:
    """`data_dir`, or a temporary dir that is removed afterwards."""
    own = data_dir is None
    path = Path(tempfile.mkdtemp(prefix=prefix) if own else data_dir).resolve()
    try:
        yield path
    finally:
        if own:
            shutil.rmtree(path, ignore_errors=True)


def write_digits(work: Path, limit: int, name: str = "digits") -> dict[str, int]:
    """scikit-learn's digits under `work/datasets/<name>/{train,holdout}` (see `digits_dir`); returns the counts."""
    from services.data.digits import write_digits as write

    return write(digits_dir(work, name).parent, limit=limit)


def digits_dir(work: Path, name: str = "digits", split: str = "train") -> Path:
    return Path(work) / "datasets" / name / split


def make_settings(data_dir: Path, root: Path, device: str, train_memory_mb: int | None = None):
    """Settings on `data_dir` that may read datasets under `root`; `train_memory_mb` None keeps the default."""
    from storage.settings import Settings

    extra = {} if train_memory_mb is None else {"train_memory_mb": train_memory_mb}
    return Settings(data_dir=Path(data_dir), allowed_roots=[Path(root)], device=device, **extra)


def train_fresh(spec, settings, cache_key: str | None, checkpoint: Path, reporter=None) -> tuple[dict, str]:
    """`train_job` from scratch (an earlier checkpoint would make it resume); returns its output and its own
    description of the inputs it trained from."""
    from services.jobs.progress import NullReporter
    from services.training.job import train_job

    reporter = reporter or NullReporter()
    shutil.rmtree(checkpoint, ignore_errors=True)
    out = train_job(spec, settings, cache_key, reporter, checkpoint)
    shutil.rmtree(checkpoint, ignore_errors=True)
    inputs = next((e["message"].split("inputs: ")[-1] for e in reporter.events if "inputs: " in e["message"]), "")
    return out, inputs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ child processes


def run_child(script: str, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `script argv` with this Python in its own process; returns the dict it printed with `child_result`, or
    {"error", "log"} (the last lines of its output)."""
    cmd = [sys.executable, str(Path(script).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ | (env or {}))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARK)]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}", "log": (proc.stderr or proc.stdout).strip().splitlines()[-15:]}
    return json.loads(lines[-1][len(CHILD_MARK) :])


def child_result(result: dict[str, Any]) -> None:
    print(CHILD_MARK + json.dumps(result), flush=True)


def flags(args: argparse.Namespace, names: list[str]) -> list[str]:
    """`--name value` for each of `names` set in `args` (`--name` alone for a true boolean)."""
    out: list[str] = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


# --------------------------------------------------------------------------------------------------- memory


def glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


class PeakRSS:
    """Peak resident set size per window, above the baseline taken at `start()`. Exact on Linux: writing 5 to
    /proc/self/clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS when a window starts, and
    VmHWM is read when it ends. Where that is not allowed, a thread samples the RSS every `interval_s` instead
    (`exact` False). As a `with` block: one window, `peak` and `above_baseline_mb` set on leaving."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _vm_hwm()
            return True
        except OSError:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, current_rss())
            time.sleep(self.interval_s)

    def start(self) -> PeakRSS:
        self.baseline = self.sampled = current_rss()
        self.exact = self._reset_hwm()
        if not self.exact:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def mark(self) -> int:
        """The peak RSS since `start()` or the last `mark()`; the next window starts now."""
        if self.exact:
            peak = max(_vm_hwm(), current_rss())
            self._reset_hwm()
            return peak
        peak = max(self.sampled, current_rss())
        self.sampled = current_rss()
        return peak

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.peak = self.mark()
        self.stop()

    @property
    def above_baseline_mb(self) -> float:
        return (self.peak - self.baseline) / MB


# --------------------------------------------------------------------------------------------------- report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], digits: int = 1) -> str:
    """'median (v1 v2 ...)' of repeated measurements."""
    if not values:
        return "-"
    med = f"{median(values):,.{digits}f}"
    return med if len(values) == 1 else f"{med} ({' '.join(f'{v:,.{digits}f}' for v in values)})"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b != b or b <= 0:
        return None
    return a / b


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:,.{digits}f}"


def render(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def put(kv: dict[str, str], key: str, value: float | None, digits: int = 3) -> None:
    """kv[key] = value with `digits` decimals, 'nan' when it was not measured."""
    kv[key] = "nan" if value is None or value != value else f"{value:.{digits}f}"


def print_kv(kv: dict[str, str]) -> None:
    """The last line of a benchmark's output, for scripts."""
    print(" ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine_line(load_start: float) -> str:
    import torch

    return (
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average (1 min) "
        f"{load_start:.2f} at the start, {load_average():.2f} at the end (other processes on a shared machine slow "
        "every timing)"
    )


# ------------------------------------------------------------------------------------------------ arguments


SMOKE_HELP = (
    "tiny data, one round: seconds on 2 CPU cores, through the same code path and ending with the same headline keys "
    "(its test under tests/bench/ runs it so; the figures mean nothing)"
)


def parse_with_smoke(p: argparse.ArgumentParser, argv: list[str] | None, smoke: dict[str, Any]) -> argparse.Namespace:
    """`p.parse_args(argv)` with `--smoke` added: under it, `smoke` ({dest: value}) replaces the parser's defaults,
    so a flag given on the command line still wins."""
    p.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**smoke)
    return p.parse_args(argv)


def add_common_args(p: argparse.ArgumentParser, cpu_limit: int) -> None:
    """--backbone, --image-size, --limit, --device, --data-dir, --train-memory-mb (see `resolve_defaults`)."""
    p.add_argument("--backbone", help="timm ViT (default: vit_tiny_patch16_224 on CPU, vit_base_patch16_224 on CUDA)")
    p.add_argument("--image-size", type=int, help="input size in pixels (default: 112 on CPU, 224 on CUDA)")
    p.add_argument(
        "--limit", type=int, help=f"digits written (default: {cpu_limit} on CPU, all 1,797 on CUDA); 10%% held out"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--data-dir", help="working dir: digits, cache, models (default: a temporary dir, removed after)")
    p.add_argument(
        "--train-memory-mb",
        type=int,
        help="Settings.train_memory_mb: cached features up to this size are held in memory, beyond it streamed "
        "(default: 32768 on CUDA, the Settings default on CPU)",
    )


def resolve_defaults(args: argparse.Namespace, cpu_limit: int) -> bool:
    """Fills the device-dependent defaults of `add_common_args`; returns whether the device is CUDA."""
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.backbone = args.backbone or ("vit_base_patch16_224" if gpu else "vit_tiny_patch16_224")
    args.image_size = args.image_size or (224 if gpu else 112)
    args.limit = args.limit or (1797 if gpu else cpu_limit)
    if args.train_memory_mb is None and gpu:
        args.train_memory_mb = 32768
    return gpu
