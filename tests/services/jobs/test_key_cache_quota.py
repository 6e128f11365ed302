"""A key's feature cache quota as the extract step applies it, with real extractions and a real Redis: an entry counts
against the key that created it, a key's job evicts that key's own least recently used entries to fit (never another
key's), and a job whose entry cannot fit fails `quota_exceeded`, naming the quota, the usage and the setting."""

from __future__ import annotations

from pathlib import Path

from services.extraction import planned_bytes, prepare
from services.jobs.pipeline import extract_step
from services.spec import JobSpec
from storage.cache import FeatureCache
from storage.redis import JobStore
from storage.settings import Settings


def spec(digits: Path, method: dict) -> dict:
    return {
        "dataset": {"path": str(digits)},
        "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32},
        "method": method,
        "extraction": {"batch_size": 64},
        "training": {"epochs": 1},
    }


def extract(store: JobStore, settings: Settings, body: dict, owner: str) -> dict:
    job = store.create_job(body, owner=owner)
    extract_step(store, settings, job["id"])
    return store.get_job(job["id"])


def test_a_key_evicts_only_its_own_entries_to_fit_its_quota(settings: Settings, digits_root: Path) -> None:
    store = JobStore.from_url(settings.broker_url)
    cache = FeatureCache(settings.cache_location)
    linear, losa = (
        spec(digits_root / "train", {"name": "linear"}),
        spec(digits_root / "train", {"name": "losa", "layers": 2}),
    )
    first = extract(store, settings, linear, "key-a")
    assert first["extracted"], first["error"]
    probe = cache.entry(first["cache_key"])
    assert probe.creator["owner"] == "key-a" and probe.users == ["key-a"]

    # a quota that holds A's LoSA entry but not both: A's next job evicts A's own linear entry
    side = planned_bytes(prepare(JobSpec.model_validate(losa), settings))
    tight = settings.model_copy(update={"key_quota_cache_gb": (side + probe.nbytes() - 1) / 1e9})
    second = extract(store, settings=tight, body=losa, owner="key-a")
    assert second["extracted"], second["error"]
    assert [e.key for e in cache.entries()] == [second["cache_key"]]
    events = [e["message"] for e in store.events(second["id"])]
    assert any("evicted 1 of this key's least recently used cache entries" in m for m in events), events

    # B's linear probe reuses A's LoSA entry (it covers the last block): B is recorded as a user, not charged
    third = extract(store, tight, linear, "key-b")
    assert third["metrics"]["cache_hit"] and third["cache_key"] == second["cache_key"]
    assert cache.entry(second["cache_key"]).users == ["key-a", "key-b"] and cache.owner_bytes("key-b") == (0, 0)

    # B's own entry under a quota that holds it alone: B's job never evicts A's entry to make room
    wide = spec(digits_root / "train", {"name": "losa", "layers": 4})
    alone = settings.model_copy(
        update={"key_quota_cache_gb": planned_bytes(prepare(JobSpec.model_validate(wide), settings)) / 1e9}
    )
    fourth = extract(store, alone, wide, "key-b")
    assert fourth["extracted"] and cache.entry(fourth["cache_key"]).creator["owner"] == "key-b", fourth["error"]
    assert cache.entry(second["cache_key"]).is_complete

    # an entry larger than A's whole quota: refused at once (A's entries are not evicted for nothing), no claim left
    bigger = {**linear, "backbone": {**linear["backbone"], "image_size": 48}}  # another family: no entry covers it
    need = planned_bytes(prepare(JobSpec.model_validate(bigger), settings))
    fifth = extract(store, settings.model_copy(update={"key_quota_cache_gb": (need - 1) / 1e9}), bigger, "key-a")
    error = fifth["error"]
    assert fifth["status"] == "failed" and error["code"] == "quota_exceeded", error
    assert "feature cache quota of this API key exceeded" in error["message"]
    assert "SIDETUNE_KEY_QUOTA_CACHE_GB" in error["message"] and "with this job's entry" in error["message"]
    assert sorted(e.key for e in cache.entries()) == sorted([second["cache_key"], fourth["cache_key"]])
