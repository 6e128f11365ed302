"""Open Inference Protocol v2 (KServe v2 / Triton REST) tensors: parse an infer request, encode its response.

Inputs (exactly one per request):
- `image`: BYTES `[N]` (or `[N, 1]`), each element an encoded image file (PNG, JPEG, ...). In JSON, each element is
  the image's base64 text; with the binary tensor extension, the raw bytes (4-byte little-endian length + bytes).
- `pixels`: UINT8 `[N, H, W, 3]`, RGB images; in JSON a flat (row-major) or nested list of integers.
- `video`: BYTES `[N]` like `image`, each element an encoded video file, for a model trained on clips (its only
  input).
Outputs: `label` BYTES `[N]` (class names) and `probabilities` FP32 `[N, C]`, in JSON or, when the request asks for it
(`parameters.binary_data_output`, or an output's `parameters.binary_data`), as binary data after the JSON header
(`Inference-Header-Content-Length`), as tritonclient sends and reads by default. Knows nothing of torch.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

HEADER = "inference-header-content-length"
INPUTS = {"image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, 3]), "video": ("BYTES", [-1])}
IMAGE_INPUTS, VIDEO_INPUTS = ("image", "pixels"), ("video",)
OUTPUTS = ("label", "probabilities")


class ProtocolError(ValueError):
    """A request the protocol or the model cannot take; the message names the input or field (HTTP 400)."""


@dataclass
class InferRequest:
    id: str | None
    input: str  # `image`, `pixels` or `video`
    images: list[bytes] | np.ndarray  # encoded files (images or videos), or uint8 [N, H, W, 3]
    outputs: list[str]
    binary: dict[str, bool]  # per output: binary data or JSON

    def __len__(self) -> int:
        return len(self.images)


def _binary_chunks(raw: bytes, inputs: list[dict[str, Any]]) -> dict[int, bytes]:
    """The binary data of each input that declares `binary_data_size`, in input order after the JSON header."""
    chunks, offset = {}, 0
    for i, tensor in enumerate(inputs):
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(raw):
            raise ProtocolError(f"input {tensor.get('name')!r}: binary_data_size {size!r} does not fit the body")
        chunks[i], offset = raw[offset : offset + size], offset + size
    if offset != len(raw):
        raise ProtocolError(f"{len(raw) - offset} bytes of binary data after the inputs belong to no input")
    return chunks


def _deserialize_bytes(data: bytes, name: str) -> list[bytes]:
    """The BYTES binary layout: each element as a 4-byte little-endian length and its bytes."""
    out, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ProtocolError(f"input {name!r}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + n > len(data):
            raise ProtocolError(f"input {name!r}: a BYTES element claims {n} bytes past the end of the data")
        out.append(data[offset : offset + n])
        offset += n
    return out


def _images(tensor: dict[str, Any], binary: bytes | None, max_images: int) -> list[bytes] | np.ndarray:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name not in INPUTS:
        raise ProtocolError(f"unknown input {name!r}: send `image` (BYTES, encoded files) or `pixels` (UINT8 "
                            "[N, H, W, 3]), or `video` (BYTES, encoded video files) to a model trained on "
                            "clips")  # fmt: skip
    expected = INPUTS[name][0]
    if datatype != expected:
        raise ProtocolError(f"input {name!r}: datatype {datatype!r}, expected {expected}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    n = shape[0] if shape else 0
    if n > max_images:
        raise ProtocolError(f"input {name!r}: {n} images; at most {max_images} per request")
    if name in ("image", "video"):
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or n == 0:
            raise ProtocolError(f"input {name!r}: shape {shape}, expected [N] or [N, 1] with N >= 1")
        if binary is not None:
            items = _deserialize_bytes(binary, name)
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
                raise ProtocolError(f"input {name!r}: data must be a list of base64 strings (one per file)")
            try:
                items = [base64.b64decode(x, validate=True) for x in data]
            except (binascii.Error, ValueError):
                raise ProtocolError(f"input {name!r}: an element is not valid base64") from None
        if len(items) != n:
            raise ProtocolError(f"input {name!r}: shape {shape} says {n} files, the data holds {len(items)}")
        return items
    if len(shape) != 4 or shape[3] != 3 or min(shape) == 0:
        raise ProtocolError(f"input 'pixels': shape {shape}, expected [N, H, W, 3] with N, H, W >= 1")
    count = int(np.prod(shape))
    if binary is not None:
        if len(binary) != count:
            raise ProtocolError(f"input 'pixels': shape {shape} needs {count} bytes, got {len(binary)}")
        return np.frombuffer(binary, np.uint8).reshape(shape)
    try:
        values = np.asarray(tensor.get("data"), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ProtocolError("input 'pixels': data must be a (flat or nested) list of integers") from None
    if values.size != count:
        raise ProtocolError(f"input 'pixels': shape {shape} needs {count} values, got {values.size}")
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ProtocolError("input 'pixels': values must lie in 0..255 (UINT8)")
    return values.astype(np.uint8).reshape(shape)


def parse_request(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """An infer request from its body (JSON, or JSON then binary data when `header_length` is given)."""
    raw = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length!r} does not fit the body")
        body, raw = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with `inputs`")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs) or len(inputs) != 1:
        raise ProtocolError("`inputs` must hold exactly one tensor: `image` (BYTES) or `pixels` (UINT8), or `video` "
                            "(BYTES)")  # fmt: skip
    chunks = _binary_chunks(raw, inputs)
    images = _images(inputs[0], chunks.get(0), max_images)

    params = request.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    wanted = request.get("outputs")
    if wanted is None:
        outputs, binary = list(OUTPUTS), dict.fromkeys(OUTPUTS, default_binary)
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("`outputs` must be a list of {name, parameters} objects")
        outputs, binary = [], {}
        for o in wanted:
            if o.get("name") not in OUTPUTS:
                raise ProtocolError(f"unknown output {o.get('name')!r}; the outputs are {', '.join(OUTPUTS)}")
            outputs.append(o["name"])
            binary[o["name"]] = bool((o.get("parameters") or {}).get("binary_data", default_binary))
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, inputs[0]["name"], images, outputs,
                        binary)  # fmt: skip


def encode_response(model_id: str, request: InferRequest, classes: list[str], probs: np.ndarray
                    ) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """The response body and its headers: JSON, or JSON then the binary outputs (`Inference-Header-Content-Length`)."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    labels = [classes[int(i)] for i in probs.argmax(axis=1)]
    tensors = {
        "label": ("BYTES", [len(labels)], labels),
        "probabilities": ("FP32", list(probs.shape), probs),
    }
    outputs, blobs = [], []
    for name in request.outputs:
        datatype, shape, value = tensors[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if request.binary[name]:
            if datatype == "BYTES":
                blob = b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in value)
            else:
                blob = value.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = value if datatype == "BYTES" else value.reshape(-1).tolist()
        outputs.append(out)
    response: dict[str, Any] = {"model_name": model_id, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}


def model_metadata(record: dict[str, Any]) -> dict[str, Any]:
    """`GET /v2/models/{id}`: the inputs the model takes (a video model: `video` only) and the outputs it gives (N:
    any number of images or videos)."""
    names = VIDEO_INPUTS if record.get("video") is not None else IMAGE_INPUTS
    return {
        "name": record["id"],
        "versions": ["1"],
        "platform": "sidetune",
        "inputs": [{"name": name, "datatype": INPUTS[name][0], "shape": INPUTS[name][1]} for name in names],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(record["classes"])]}],
        "parameters": {"classes": record["classes"], "method": record["method"], "backbone": record["backbone"]},
    }  # fmt: skip
