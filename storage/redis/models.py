"""The model registry in Redis: a record per trained model (`model:<id>`) and an index by creation time. A model's
bytes count against its owner's models quota (storage/redis/usage.py) from its registration until its deletion."""

from __future__ import annotations

import json

import redis

from storage.quotas import ARTIFACTS
from storage.redis import keys
from storage.redis.records import ModelRecord, NotFound
from storage.redis.usage import Usage


class Models:
    def __init__(self, client: redis.Redis, usage: Usage) -> None:
        self.r = client
        self.usage = usage

    def register_model(self, model: ModelRecord) -> ModelRecord:
        """Record a model; its `size_bytes` counts against its owner's models quota once (a repeated train step
        registers the same model again)."""
        key, blob = keys.model(model["id"]), json.dumps(model)
        fresh = self.r.set(key, blob, nx=True)
        pipe = self.r.pipeline()
        if not fresh:
            pipe.set(key, blob)
        pipe.zadd(keys.MODELS, {model["id"]: model["created_at"]})
        if fresh:  # in the same transaction as the index: counted once, with the record
            self.usage.add(model.get("owner"), ARTIFACTS, int(model.get("size_bytes") or 0), pipe=pipe)
        pipe.execute()
        return model

    def delete_model(self, model_id: str) -> None:
        raw = self.r.get(keys.model(model_id))
        pipe = self.r.pipeline()
        pipe.delete(keys.model(model_id))
        pipe.zrem(keys.MODELS, model_id)
        deleted, _ = pipe.execute()
        if deleted and raw:  # the one caller that removed it gives its bytes back
            model: ModelRecord = json.loads(raw)
            self.usage.add(model.get("owner"), ARTIFACTS, -int(model.get("size_bytes") or 0))

    def registered_models(self, model_ids: list[str]) -> set[str]:
        """Which of `model_ids` are registered (not deleted), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for model_id in model_ids:
            pipe.exists(keys.model(model_id))
        return {model_id for model_id, n in zip(model_ids, pipe.execute(), strict=True) if n}

    def get_model(self, model_id: str) -> ModelRecord:
        raw = self.r.get(keys.model(model_id))
        if raw is None:
            raise NotFound(model_id)
        return json.loads(raw)

    def list_models(self, limit: int = 100, owner: str | None = None) -> list[ModelRecord]:
        ids = self.r.zrevrange(keys.MODELS, 0, -1)
        raws = self.r.mget([keys.model(i) for i in ids]) if ids else []
        models: list[ModelRecord] = [json.loads(raw) for raw in raws if raw]
        return [m for m in models if owner is None or m.get("owner") == owner][:limit]
