"""bench/fairness.py --smoke against the session's keyed API (`keyed_api`), so that it cannot rot: it runs a backlog
of one job and B's one, prints its table and ends with its `key=value` line."""

from __future__ import annotations

from tests.bench.smoke import run_smoke
from tests.conftest import TENANT_KEYS


def test_the_fairness_bench_runs_against_a_running_api(keyed_api) -> None:
    data = keyed_api.settings.data_path / "datasets" / "digits" / "train"
    args = ["--api", keyed_api.api_url, "--key-a", TENANT_KEYS["a"], "--key-b", TENANT_KEYS["b"], "--data", str(data)]
    run = run_smoke("fairness.py", *args)
    assert run.lines[0].split()[:3] == ["after", "B", "submitted"] and "B's job: queued -> started" in run.stdout
    assert set(run.kv) == {"b_wait_s", "b_train_wait_s", "b_done_s", "a_started_ahead", "a_trained_ahead", "jobs"}
    figures = run.numbers(*run.kv)
    assert figures["b_wait_s"] >= 0 and figures["a_started_ahead"] <= 2 and run.kv["jobs"] == "1"
