"""Rich progress bars that follow jobs until they end (used by `sidetune submit --wait` and the demo)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from worker.api_types import Job
from worker.client import TERMINAL, Client


def console() -> Console:
    """A console that never truncates tables when output goes to a file or a pipe."""
    c = Console()
    return c if c.is_terminal else Console(width=200)


def follow(client: Client, job_ids: list[str], poll_s: float = 0.5) -> list[Job]:
    """Bars for the jobs until every one has ended; the jobs as they ended, in the order given."""
    jobs: dict[str, Job] = {}
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TextColumn("{task.fields[status]:<34}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns) as bars:
        tasks = {j: bars.add_task(j, total=1, status="queued") for j in job_ids}
        while True:
            for job_id in job_ids:
                job = jobs[job_id] = client.job(job_id)
                prog = job.get("progress") or {}
                done, total = prog.get("done", 0), max(prog.get("total", 1), 1)
                status = job["status"]
                metric = "val_map" if "val_map" in prog else "val_accuracy"
                if status == "training" and metric in prog:
                    status = f"training, {metric.replace('_', ' ')} {prog[metric]:.3f}"
                elif status == "extracting" and prog.get("stage") == "extracting":
                    status = f"extracting, {prog.get('images', 0)} images"
                desc = f"{job['spec']['method']['name']} {job_id[-8:]}"
                if job["status"] in TERMINAL:
                    done, total = 1, 1
                bars.update(tasks[job_id], description=desc, completed=done, total=total, status=status)
            if all(j["status"] in TERMINAL for j in jobs.values()):
                return [jobs[j] for j in job_ids]
            time.sleep(poll_s)
