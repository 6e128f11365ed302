"""What the JSON nesting limit (api/json_depth.py) costs: the depth count over bodies of `--mb` MB (32, the default
request limit) of four kinds, fed in the 64 KiB chunks uvicorn hands over, against json.loads of the same body (the
parse that follows it anyway).

    python bench/json_depth.py [--mb 32] [--repeats 3]
    python bench/json_depth.py --smoke      # half a megabyte, once (the smoke test)

Kinds: a v1 predict of base64 images (few brackets), a v2 `pixels` tensor as nested lists (a bracket every 4
bytes), a list of short strings holding brackets and escaped quotes, and a body of JSON strings of backslashes.
"""

from __future__ import annotations

import argparse
import json
import time

from common import fmt, parse_with_smoke, print_kv, put, render, say

from api.json_depth import DepthScanner

CHUNK = 65536


def bodies(mb: float) -> dict[str, bytes]:
    n = int(mb * 2**20)
    pixels = json.dumps(
        {
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [[[[1, 2, 3]]]] * (n // 15)}
            ]
        }
    )
    return {
        "v1 base64 images": json.dumps({"instances": [{"image_b64": "QUJD" * (n // 256)}] * 64}).encode(),
        "v2 nested pixels": pixels.encode(),
        "short strings": json.dumps(['a[\\"{b'] * (n // 11)).encode(),
        "backslashes": json.dumps(["\\" * 64] * (n // 132)).encode(),
    }


def scan(body: bytes) -> float:
    start, scanner = time.perf_counter(), DepthScanner()
    for i in range(0, len(body), CHUNK):
        assert scanner.feed(body[i : i + CHUNK])
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=32.0, help="body size in MB")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parse_with_smoke(p, argv, {"mb": 0.5, "repeats": 1})
    rows, kv = [], {}
    for kind, body in bodies(args.mb).items():
        say(f"{kind}: {len(body) / 2**20:.1f} MB")
        count = min(scan(body) for _ in range(args.repeats))
        start = time.perf_counter()
        json.loads(body)
        parse = time.perf_counter() - start
        rows.append(
            [
                kind,
                fmt(len(body) / 2**20),
                fmt(count * 1e3),
                fmt(len(body) / 2**20 / count, 0),
                fmt(parse * 1e3),
                fmt(100 * count / parse),
            ]
        )
        put(kv, f"depth_ms_{kind.replace(' ', '_')}", count * 1e3, 1)
    print(render(["body", "MB", "depth count ms", "MB/s", "json.loads ms", "count / parse %"], rows))
    put(kv, "depth_ms_max", max(float(v) for v in kv.values()), 1)
    print_kv(kv)


if __name__ == "__main__":
    main()
