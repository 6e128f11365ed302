"""Uploaded datasets' records (storage/redis/datasets.py) against a real Redis server."""

from __future__ import annotations

import time

import pytest
import redis

from storage.redis import NotFound
from storage.redis.datasets import DatasetRecords


def test_records(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    records = DatasetRecords(client)
    a = records.add({"id": "ds_a1", "owner": "alice", "classes": ["x", "y"]})
    time.sleep(0.01)
    records.add({"id": "ds_b1", "owner": "bob", "classes": ["x", "y"]})
    assert records.get("ds_a1") == a and a["created_at"] > 0
    ids = [d["id"] for d in records.list_datasets(owner="alice")]
    assert ids == ["ds_a1"]
    assert [d["id"] for d in records.list_datasets()][:2] == ["ds_b1", "ds_a1"]
    records.add_job("ds_a1", "job_1")
    records.add_job("ds_a1", "job_1")
    assert records.job_ids("ds_a1") == ["job_1"]
    records.delete("ds_a1")
    with pytest.raises(NotFound):
        records.get("ds_a1")
    assert records.job_ids("ds_a1") == [] and "ds_a1" not in [d["id"] for d in records.list_datasets()]
    records.delete("ds_b1")
