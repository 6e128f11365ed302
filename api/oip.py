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
import itertools
import json
import math
import reprlib
import struct
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np

from storage.redis import ModelRecord

HEADER = "inference-header-content-length"
INPUTS = {"image": ("BYTES", [-1]), "pixels": ("UINT8", [-1, -1, -1, 3]), "video": ("BYTES", [-1])}
IMAGE_INPUTS, VIDEO_INPUTS = ("image", "pixels"), ("video",)
OUTPUTS = ("label", "probabilities")


class ProtocolError(ValueError):
    """A request the protocol or the model cannot take; the message names the input or field (HTTP 400, or 413
    `too_many_pixels` for pixels over the request's budget)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Parameters(TypedDict, total=False):
    """A `parameters` object: the keys of the binary tensor extension this server reads (others are ignored)."""

    binary_data_size: int  # an input's: the bytes of its binary data after the JSON header
    binary_data: bool  # an output's: answer it as binary data
    binary_data_output: bool  # the request's: every output as binary data, unless the output says otherwise


class RequestInput(TypedDict, total=False):
    """An input tensor of an infer request, as the protocol shapes it. The request is a client's JSON: the parser
    checks every value before it trusts its type."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters
    data: list[object]  # BYTES: base64 strings; UINT8: integers, flat or nested (each checked, _uint8_values)


class RequestOutput(TypedDict, total=False):
    name: str
    parameters: Parameters


class InferBody(TypedDict, total=False):
    """An infer request's JSON (the header, when binary data follows it)."""

    id: str
    inputs: list[RequestInput]
    outputs: list[RequestOutput]
    parameters: Parameters


class OutputTensor(TypedDict):
    name: str
    datatype: str
    shape: list[int]
    parameters: NotRequired[Parameters]  # binary: its `binary_data_size`
    data: NotRequired[list[str] | list[float]]  # JSON: labels, or probabilities row-major


class InferResponse(TypedDict):
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: NotRequired[str]  # the request's, when it gave one


class TensorMetadata(TypedDict):
    name: str
    datatype: str
    shape: list[int]  # -1: any size


class MetadataParameters(TypedDict):
    classes: list[str]  # in output order
    method: str
    backbone: str


class ModelMetadata(TypedDict):
    """`GET /v2/models/{id}`."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: MetadataParameters


@dataclass
class InferRequest:
    id: str | None
    input: str  # `image`, `pixels` or `video`
    images: list[bytes] | np.ndarray  # encoded files (images or videos), or uint8 [N, H, W, 3]
    outputs: list[str]
    binary: dict[str, bool]  # per output: binary data or JSON

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Limits:
    """What one request may hold: images (`max_predict_images`), pixels together (`max_predict_pixels`), and the
    bytes it came in (which bound the values a JSON tensor can hold)."""

    max_images: int
    max_pixels: int
    body_bytes: int


def _binary_chunks(raw: bytes, inputs: list[RequestInput]) -> dict[int, bytes]:
    """The binary data of each input that declares `binary_data_size`, in input order after the JSON header."""
    chunks, offset = {}, 0
    for i, tensor in enumerate(inputs):
        size = _parameters(tensor, f"input {_name(tensor)}").get("binary_data_size")
        if size is None:
            continue
        if not _count(size) or offset + size > len(raw):
            raise ProtocolError(f"input {_name(tensor)}: binary_data_size {_show(size)} does not fit the body")
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


def _images(tensor: RequestInput, binary: bytes | None, limits: Limits) -> list[bytes] | np.ndarray:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or name not in INPUTS:
        raise ProtocolError(
            f"unknown input {_show(name)}: send `image` (BYTES, encoded files) or `pixels` (UINT8 "
            "[N, H, W, 3]), or `video` (BYTES, encoded video files) to a model trained on "
            "clips"
        )
    expected = INPUTS[name][0]
    if datatype != expected:
        raise ProtocolError(f"input {name!r}: datatype {_show(datatype)}, expected {expected}")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(map(_count, shape)):
        raise ProtocolError(
            f"input {name!r}: shape must be a list of 1 to 4 non-negative integers (not booleans), got {_show(shape)}"
        )
    n = shape[0]
    if n > limits.max_images:
        raise ProtocolError(f"input {name!r}: {n} images; at most {limits.max_images} per request")
    if name in ("image", "video"):
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or n == 0:
            raise ProtocolError(f"input {name!r}: shape {_show(shape)}, expected [N] or [N, 1] with N >= 1")
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
            raise ProtocolError(f"input {name!r}: shape {_show(shape)} says {n} files, the data holds {len(items)}")
        return items
    if len(shape) != 4 or shape[3] != 3 or min(shape) == 0:
        raise ProtocolError(f"input 'pixels': shape {_show(shape)}, expected [N, H, W, 3] with N, H, W >= 1")
    # Exact integers, before numpy sees the shape: its int64 product of [1, 2^32, 2^32, 3] wraps to 0.
    count = math.prod(shape)
    if binary is not None:
        if len(binary) != count:
            raise ProtocolError(f"input 'pixels': shape {_show(shape)} needs {_show(count)} bytes, got {len(binary)}")
    elif count > limits.body_bytes // 2 + 1:  # a JSON value takes a digit and a separator at least
        raise ProtocolError(
            f"input 'pixels': shape {_show(shape)} says {_show(count)} values; a request of "
            f"{limits.body_bytes} bytes holds fewer"
        )
    if (pixels := math.prod(shape[:3])) > limits.max_pixels:
        raise ProtocolError(
            f"input 'pixels': shape {_show(shape)} holds {pixels} pixels; at most {limits.max_pixels} "
            "per request (SIDETUNE_MAX_PREDICT_PIXELS)",
            413,
            "too_many_pixels",
        )
    if binary is not None:
        return np.frombuffer(binary, np.uint8).reshape(shape)
    return np.array(_uint8_values(tensor.get("data"), shape, count), dtype=np.uint8).reshape(shape)


def _uint8_values(data: Any, shape: list[int], count: int) -> list[int]:
    """The `count` values of a flat or nested (rectangular) list of integers in 0..255, each checked before numpy
    converts any: numpy would turn `true` into 1, `"7"` into 7 and 1.5 into 1, and raise OverflowError on 1e30."""
    what = "input 'pixels': data must be a flat list, or nested lists of equal length, of integers in 0..255 (UINT8)"
    if not isinstance(data, list):
        raise ProtocolError(f"{what}; got {_show(data)}")
    values = data
    while values and type(values[0]) is list and len(values) <= count:
        if not all(type(v) is list for v in values) or len(set(map(len, values))) != 1:
            raise ProtocolError(f"{what}; the nesting is ragged or mixes lists and numbers")
        values = list(itertools.chain.from_iterable(values))
    if len(values) != count:
        got = f"{len(values)}" if len(values) < count else f"more than {count}"
        raise ProtocolError(f"input 'pixels': shape {_show(shape)} needs {count} values, the data holds {got}")
    if set(map(type, values)) - {int}:
        i, v = next((i, v) for i, v in enumerate(values) if type(v) is not int)
        raise ProtocolError(f"input 'pixels': value {i} is {_kind(v)}; expected an integer in 0..255 (UINT8)")
    if values and (min(values) < 0 or max(values) > 255):
        i, v = next((i, v) for i, v in enumerate(values) if not 0 <= v <= 255)
        raise ProtocolError(f"input 'pixels': value {i} is {_show(v)}; expected an integer in 0..255 (UINT8)")
    return values


def _count(value: Any) -> bool:
    """A non-negative integer, not a boolean (JSON's `true` is Python's 1)."""
    return type(value) is int and value >= 0


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float):
        finite = math.isfinite(value)
        return f"{value!r}, " + ("a number with a fraction or an exponent" if finite else "not a finite number")
    if isinstance(value, str):
        return f"the string {_show(value)}"
    return "null" if value is None else f"a {type(value).__name__}"


_REPR = reprlib.Repr()
_REPR.maxlist, _REPR.maxdict, _REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 8, 4, 3, 60, 60, 40


def _show(value: Any) -> str:
    """repr() of a client's value, cut short (a shape, a string or a number may be megabytes of text; the product of a
    shape's integers may have more digits than Python prints)."""
    if type(value) is int and value.bit_length() > 128:
        return f"an integer of {len(str(value)) if value.bit_length() < 14000 else 'more than 4,300'} digits"
    if isinstance(value, list) and any(type(v) is int and v.bit_length() > 128 for v in value[:8]):
        return "[" + ", ".join(map(_show, value[:8])) + (", ...]" if len(value) > 8 else "]")
    return _REPR.repr(value)


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _name(tensor: RequestInput) -> str:
    return _show(tensor.get("name"))


def _parameters(parent: InferBody | RequestInput | RequestOutput, where: str) -> Parameters:
    """parent's `parameters` when it is an object (or absent: {}); 400 naming it otherwise."""
    value = parent.get("parameters")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: `parameters` must be an object, got {_show(value)}")
    return value


def _flag(parent: Parameters, key: Literal["binary_data", "binary_data_output"], where: str, default: bool) -> bool:
    value = parent.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: `{key}` must be true or false, got {_show(value)}")
    return value


def parse_request(body: bytes, header_length: str | None, max_images: int, max_pixels: int) -> InferRequest:
    """An infer request from its body (JSON, or JSON then binary data when `header_length` is given)."""
    limits = Limits(max_images, max_pixels, len(body))
    raw = b""
    if header_length is not None:
        # ASCII digits, and few of them: str.isdigit() takes "²" and int() refuses 5,000 digits
        if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 18) or int(
            header_length
        ) > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {_show(header_length)} does not fit the body")
        body, raw = body[: int(header_length)], body[int(header_length) :]
    try:
        request: InferBody = json.loads(body)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer literal of more than 4,300 digits
        raise ProtocolError(f"the request is not valid JSON: {_cut(str(e).split('; use sys.')[0])}") from None
    except RecursionError:  # the apps refuse deep bodies before (api/json_depth.py); a caller without that lands here
        raise ProtocolError("the request is not valid JSON: it nests arrays and objects too deeply") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with `inputs`")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs) or len(inputs) != 1:
        raise ProtocolError(
            "`inputs` must hold exactly one tensor: `image` (BYTES) or `pixels` (UINT8), or `video` (BYTES)"
        )
    chunks = _binary_chunks(raw, inputs)
    images = _images(inputs[0], chunks.get(0), limits)

    default_binary = _flag(_parameters(request, "the request"), "binary_data_output", "parameters", False)
    wanted = request.get("outputs")
    if wanted is None:
        outputs, binary = list(OUTPUTS), dict.fromkeys(OUTPUTS, default_binary)
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("`outputs` must be a list of {name, parameters} objects")
        outputs, binary = [], {}
        for o in wanted:
            name = o.get("name")
            if not isinstance(name, str) or name not in OUTPUTS:
                raise ProtocolError(f"unknown output {_show(name)}; the outputs are {', '.join(OUTPUTS)}")
            outputs.append(name)
            where = f"output {name!r}"
            binary[name] = _flag(_parameters(o, where), "binary_data", f"{where} parameters", default_binary)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"`id` must be a string, got {_show(request_id)}")
    return InferRequest(request_id, inputs[0]["name"], images, outputs, binary)


def encode_response(
    model_id: str, request: InferRequest, classes: list[str], probs: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or JSON then the binary outputs (`Inference-Header-Content-Length`)."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    labels = [classes[int(i)] for i in probs.argmax(axis=1)]
    tensors = {
        "label": ("BYTES", [len(labels)], labels),
        "probabilities": ("FP32", list(probs.shape), probs),
    }
    outputs: list[OutputTensor] = []
    blobs: list[bytes] = []
    for name in request.outputs:
        datatype, shape, value = tensors[name]
        out: OutputTensor = {"name": name, "datatype": datatype, "shape": shape}
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
    response: InferResponse = {"model_name": model_id, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}


def model_metadata(record: ModelRecord) -> ModelMetadata:
    """`GET /v2/models/{id}`: the inputs the model takes (a video model: `video` only) and the outputs it gives (N:
    any number of images or videos)."""
    names = VIDEO_INPUTS if record.get("video") is not None else IMAGE_INPUTS
    return {
        "name": record["id"],
        "versions": ["1"],
        "platform": "sidetune",
        "inputs": [{"name": name, "datatype": INPUTS[name][0], "shape": INPUTS[name][1]} for name in names],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(record["classes"])]},
        ],
        "parameters": {"classes": record["classes"], "method": record["method"], "backbone": record["backbone"]},
    }
