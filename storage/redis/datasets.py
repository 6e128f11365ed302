"""Uploaded datasets' records in Redis (their files are storage/datasets.py's): who uploaded each, its path and format,
its size (counted in its owner's uploads quota), and the jobs that used it."""

from __future__ import annotations

import json

import redis

from storage.redis import keys
from storage.redis.records import DatasetRecord, NotFound, now


class DatasetRecords:
    """Stored as jobs and models are: a JSON string per record, an index ordered by creation, and the jobs that used
    each dataset (so a delete can see whether one still needs it)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def add(self, record: DatasetRecord) -> DatasetRecord:
        record.setdefault("created_at", now())
        pipe = self.r.pipeline()
        pipe.set(keys.dataset(record["id"]), json.dumps(record))
        pipe.zadd(keys.DATASETS, {record["id"]: record["created_at"]})
        pipe.execute()
        return record

    @staticmethod
    def _record(raw: str) -> DatasetRecord:
        record = json.loads(raw)
        if "created" in record:  # recorded before datasets said `created_at`, as jobs and models do
            record.setdefault("created_at", record.pop("created"))
        return record

    def get(self, dataset_id: str) -> DatasetRecord:
        raw = self.r.get(keys.dataset(dataset_id))
        if raw is None:
            raise NotFound(dataset_id)
        return self._record(raw)

    def list_datasets(self, limit: int = 100, owner: str | None = None) -> list[DatasetRecord]:
        """Newest first; with an owner, that owner's only."""
        ids = self.r.zrevrange(keys.DATASETS, 0, -1)
        records = [self._record(raw) for raw in self.r.mget([keys.dataset(i) for i in ids]) if raw] if ids else []
        return [d for d in records if owner is None or d.get("owner") == owner][:limit]

    def delete(self, dataset_id: str) -> bool:
        """True for the one caller that removed the record."""
        pipe = self.r.pipeline()
        pipe.delete(keys.dataset(dataset_id))
        pipe.delete(keys.dataset_jobs(dataset_id))
        pipe.zrem(keys.DATASETS, dataset_id)
        return bool(pipe.execute()[0])

    def add_job(self, dataset_id: str, job_id: str) -> None:
        self.r.sadd(keys.dataset_jobs(dataset_id), job_id)

    def job_ids(self, dataset_id: str) -> list[str]:
        return sorted(self.r.smembers(keys.dataset_jobs(dataset_id)))
