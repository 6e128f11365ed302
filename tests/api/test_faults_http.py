"""The API over real HTTP on a Redis that refuses writes: its append-only file on a full tmpfs (`MISCONF`), or its
memory limit reached (`OOM`): every write answers 503 with Retry-After (a 500 before), `/readyz` says why, `/healthz`
stays 200, and writes go through again once Redis recovers. And the operator routes of the feature cache:
`GET /cache` and `DELETE /cache/{key}` with an admin key (403 with another, 409 while a job uses the entry), also
through `sidetune cache`."""

from __future__ import annotations

import io
import json
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import numpy as np
import redis

from api.main import create_app
from storage.cache import FeatureCache
from storage.redis.locks import CACHE_LOCK, LeaseLock, Pin
from storage.redis_server import RedisServer
from storage.settings import Settings
from tests.disk import fill
from tests.helpers import serve, shaped
from worker.api_types import CacheList, CacheMeta
from worker.launcher import free_port


def _spec(digits: Path) -> dict:
    return {
        "dataset": {"path": str(digits)},
        "backbone": {"name": "test_vit", "pretrained": False},
        "method": {"name": "linear"},
    }


def _zip(root: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*.png"))[:40]:
            zf.write(p, p.relative_to(root))
    return buf.getvalue()


def _refused(url: str, digits: Path) -> None:
    """Every write answers 503 `store_refuses_writes` with Retry-After; reads, /healthz answer; /readyz says why."""
    r = httpx.post(f"{url}/jobs", json=_spec(digits), timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert r.json()["error"]["code"] == "store_refuses_writes" and "retry shortly" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/datasets", files={"file": ("d.zip", _zip(digits))}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_refuses_writes", r.text
    assert httpx.get(f"{url}/jobs", timeout=30).status_code == 200
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    ready = httpx.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["redis"] is True, ready.json()["reason"]
    assert ready.json()["redis_writable"] is False
    assert ready.json()["reason"].startswith("Redis refuses writes"), ready.json()


def test_redis_with_its_aof_on_a_full_disk_gets_503_then_recovers(tmpfs, tmp_path: Path, digits_root: Path) -> None:
    server = RedisServer(tmpfs(2), free_port()).start()
    try:
        client = redis.Redis.from_url(server.url)
        ballast = fill(server.data_dir)
        deadline = time.monotonic() + 10
        while True:  # the AOF write after a command fails; Redis then refuses writes
            try:
                client.set("filler", "x" * 10_000)
            except redis.ResponseError as e:
                assert str(e).startswith("MISCONF"), e
                break
            assert time.monotonic() < deadline, "Redis kept taking writes on a full disk"
            time.sleep(0.05)
        app = create_app(Settings(data_dir=tmp_path, redis_url=server.url, allowed_roots=[digits_root.parent]))
        with serve(app) as url:
            _refused(url, digits_root / "train")
            assert "MISCONF" in httpx.get(f"{url}/readyz", timeout=30).json()["reason"]
            ballast.unlink()  # Redis retries the AOF write every second
            deadline = time.monotonic() + 15
            while (r := httpx.post(f"{url}/jobs", json=_spec(digits_root / "train"), timeout=30)).status_code == 503:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            assert r.status_code == 201, r.text
    finally:
        server.stop()


def test_redis_at_its_memory_limit_gets_503(tmp_path: Path, digits_root: Path) -> None:
    server = RedisServer(tmp_path / "redis", free_port()).start()
    try:
        redis.Redis.from_url(server.url).config_set("maxmemory", 1)  # noeviction is the default policy: OOM
        app = create_app(Settings(data_dir=tmp_path, redis_url=server.url, allowed_roots=[digits_root.parent]))
        with serve(app) as url:
            _refused(url, digits_root / "train")
            assert "OOM" in httpx.get(f"{url}/readyz", timeout=30).json()["reason"]
    finally:
        server.stop()


# ---- GET /cache, DELETE /cache/{key} ---------------------------------------------------------------------------------
def _entry(cache: FeatureCache, complete: bool = True) -> str:
    key = f"{uuid.uuid4().hex}/{uuid.uuid4().hex}"
    entry = cache.entry(key)
    entry.create(
        labels=np.arange(4) % 2,
        layers=[0],
        tokens="all",
        token_count=2,
        dim=4,
        batch_size=4,
        meta={"backbone": "test_vit", "num_prefix_tokens": 1},
    )
    if complete:
        entry.write_batch(0, np.ones((4, 1, 2, 4), np.float16), np.ones(4, bool))
        entry.mark_complete({})
        entry.touch()
    return key


def test_operators_list_and_delete_cache_entries(tmp_path: Path, redis_url: str, monkeypatch, capsys) -> None:
    from worker.cli import main

    settings = Settings(data_dir=tmp_path, redis_url=redis_url, api_keys=["user-key"], admin_keys=["admin-key"])
    cache = FeatureCache(settings.cache_location)
    free, read, written = _entry(cache), _entry(cache), _entry(cache, complete=False)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    lock = LeaseLock(r, CACHE_LOCK + written, token="job_writer")
    assert lock.acquire()
    admin, user = {"Authorization": "Bearer admin-key"}, {"Authorization": "Bearer user-key"}
    with Pin(r, read, holder="job_reader"), serve(create_app(settings)) as url:
        try:
            for method, path in (("GET", "/cache"), ("DELETE", f"/cache/{free}")):
                res = httpx.request(method, f"{url}{path}", headers=user)
                assert res.status_code == 403 and res.json()["error"]["code"] == "admin_only", res.text
                assert httpx.request(method, f"{url}{path}").status_code == 401

            listing = httpx.get(f"{url}/cache", headers=admin).json()
            by_key = {e["key"]: e for e in listing["data"]}
            assert set(by_key) == {free, read, written} and listing["bytes"] == sum(e["bytes"] for e in by_key.values())
            assert by_key[read]["pinned_by"] == ["job_reader"] and by_key[written]["extracting"] == "job_writer"
            assert by_key[free]["complete"] and not by_key[written]["complete"] and by_key[written]["last_used"] is None
            assert listing["free_disk_bytes"] > 0 and by_key[free]["meta"]["backbone"] == "test_vit"
            shaped(listing, CacheList)  # the client's types name every key of it (worker/api_types.py)
            shaped(by_key[free]["meta"], CacheMeta)

            for key, who in ((read, "job_reader"), (written, "job_writer")):
                res = httpx.delete(f"{url}/cache/{key}", headers=admin)
                assert res.status_code == 409 and res.json()["error"]["code"] == "cache_in_use", res.text
                assert who in res.json()["error"]["message"]
            assert httpx.delete(f"{url}/cache/{free}", headers=admin).status_code == 204
            assert not cache.entry(free).path.exists()
            assert httpx.delete(f"{url}/cache/{free}", headers=admin).status_code == 404
            assert httpx.delete(f"{url}/cache/..%2F..%2Fredis", headers=admin).status_code == 404

            monkeypatch.setenv("SIDETUNE_API_KEY", "admin-key")
            assert main(["cache", "list", "--url", url, "--json"]) == 0
            assert {e["key"] for e in json.loads(capsys.readouterr().out)["data"]} == {read, written}
            lock.release()  # the extraction ended (here: it failed): its partial entry may go
            assert main(["cache", "delete", written, "--url", url]) == 0
            assert capsys.readouterr().out.strip() == f"deleted cache entry {written}"
            assert [e.key for e in cache.entries()] == [read]
        finally:
            lock.release()


def test_an_upload_that_fills_the_disk_is_507_and_one_larger_than_it_409(
    tmpfs, redis_url: str, digits_root: Path
) -> None:
    """A full disk while a dataset is extracted was a 500; an archive larger than the free space is the request's
    own fault (409), one whose extraction fills the disk the server's (507 `disk_full` naming the directory).
    Nothing is left behind."""
    disk = tmpfs(1)
    settings = Settings(data_dir=disk, redis_url=redis_url)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for c in ("a", "b"):
            zf.writestr(f"{c}/big.png", b"\0" * 800_000)  # 1.6 MB extracted from a few kB
    with serve(create_app(settings)) as url:
        r = httpx.post(f"{url}/datasets", files={"file": ("d.zip", _zip(digits_root) + b"\0" * 1_200_000)}, timeout=60)
        assert r.status_code == 409 and r.json()["error"]["code"] == "upload_does_not_fit", r.text
        r = httpx.post(f"{url}/datasets", files={"file": ("d.zip", buf.getvalue())}, timeout=60)
        assert r.status_code == 507 and r.json()["error"]["code"] == "disk_full", r.text
        assert f"no space left under {disk / 'datasets'}" in r.json()["error"]["message"]
    assert not [p for p in (disk / "datasets").rglob("*") if p.is_file()]
