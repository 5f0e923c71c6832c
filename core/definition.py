"""Job definitions: the content-addressed job id and the checks run at submission.

The job id is computed exactly as the seed does (`seed-spec.md` §3): the
lowercase hex SHA-256 of the canonical JSON (keys sorted by UTF-16 code
units, no whitespace, JavaScript number formatting) of a whitelist of the
definition's fields.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from google.protobuf import json_format

from jobwire.core.command import split_command
from jobwire.core.units import parse_duration, parse_size
from jobwire.v1 import definition_pb2

DATA_REF_TYPES = frozenset({"base64", "utf8", "json", "url", "key"})
_SCALARS = ("v", "image", "command", "entrypoint", "workdir", "shmSize", "maxDuration", "tags")
_BUILD_FIELDS = (
    "context",
    "buildContext",
    "filename",
    "target",
    "dockerfile",
    "buildArgs",
    "platform",
)
_REQUIREMENT_FIELDS = ("cpus", "gpus", "maxDuration", "memory")
_PARENT_INJECTED_ENV = frozenset({"channel", "CHANNEL", "readonly", "edit", "parent-metapage-id", "fs-path"})
_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_PATH_LENGTH = 1024
MAX_INLINE_BYTES = 1024 * 1024
"""Largest inline (base64, utf8, json) input or config file; larger files go to the blob store."""
MAX_DEFINITION_BYTES = 8 * 1024 * 1024
"""Largest definition, inline inputs included."""
MAX_BATCH_JOBS = 1000
"""Most jobs one `SubmitJobs` call takes."""
MAX_RESULT_OUTPUTS = 4 * 1024 * 1024
"""Most bytes a result's outputs may take (their names and inline contents or keys). A job's JSON
holds its definition (at most `MAX_DEFINITION_BYTES`) and its result; Envoy buffers at most 16 MiB to
transcode a response, and a gRPC client accepts 4 MiB unless told otherwise. The worker collects
outputs within it; the server checks every result against it again."""


class DefinitionError(ValueError):
    """A job definition that cannot run; the message says what to fix."""


def job_id(definition: definition_pb2.JobDefinition) -> str:
    """The job id: SHA-256 hex of the canonical JSON of the hashed fields."""
    return hashlib.sha256(canonical_json(hash_blob(definition)).encode()).hexdigest()


def to_dict(message: Any) -> dict[str, Any]:
    """A message in its JSON mapping (camelCase names, as the seed writes them)."""
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def hash_blob(definition: definition_pb2.JobDefinition) -> dict[str, Any]:
    """The part of a definition that makes its id (the seed's whitelist)."""
    source = to_dict(definition)
    blob: dict[str, Any] = {k: source[k] for k in _SCALARS if source.get(k) is not None}
    for name, fields in (("build", _BUILD_FIELDS), ("requirements", _REQUIREMENT_FIELDS)):
        part = {k: v for k, v in source.get(name, {}).items() if k in fields and v is not None}
        if part:
            blob[name] = part
    if isinstance(context := blob.get("build", {}).get("context"), str):
        blob["build"]["context"] = without_credentials(context)  # a token is no part of what is built
    env = {k: v for k, v in source.get("env", {}).items() if not _parent_injected(k)}
    if env:
        blob["env"] = env
    for name in ("inputs", "configFiles"):
        refs = {path: _hashed_ref(ref) for path, ref in source.get(name, {}).items()}
        if refs:
            blob[name] = refs
    return blob


def has_build(definition: definition_pb2.JobDefinition) -> bool:
    """True when the definition builds its image: `build` holds a field (`build: {}` is no build,
    hashed as absent, as the seed does)."""
    return definition.HasField("build") and definition.build.ByteSize() > 0


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")


def without_credentials(text: str) -> str:
    """`text` (a URL, or a message naming URLs) without their `user:token@` parts: what a job id,
    a log line, an error or a response may show."""
    return _USERINFO.sub(r"\1", text)


def shown(definition: definition_pb2.JobDefinition) -> definition_pb2.JobDefinition:
    """A copy of the definition as a response may show it: the credentials of its build context and
    of its `url` inputs and config files removed (the worker is given the stored one)."""
    copy = definition_pb2.JobDefinition()
    copy.CopyFrom(definition)
    if copy.build.HasField("context"):
        copy.build.context = without_credentials(copy.build.context)
    for refs in (copy.inputs, copy.config_files):
        for ref in refs.values():
            if ref.type == "url" and ref.value.WhichOneof("kind") == "string_value":
                ref.value.string_value = without_credentials(ref.value.string_value)
    return copy


def _parent_injected(key: str) -> bool:
    return key in _PARENT_INJECTED_ENV or re.match(r"^mp[-_]", key) is not None


def _hashed_ref(ref: Mapping[str, Any]) -> dict[str, Any]:
    hashed = {k: ref[k] for k in ("value", "type") if ref.get(k) is not None}
    value = hashed.get("value")
    if hashed.get("type") == "url" and isinstance(value, str):
        hashed["value"] = _normalised_url(value)
    return hashed


def _normalised_url(url: str) -> str:
    if "/presignedurl/" in url:
        return url.split("/presignedurl/", 1)[0]
    if url.startswith("https://metaframe-asman-test.s3.us-west-1.amazonaws.com"):
        return re.split(r"[?#]", url, maxsplit=1)[0]
    return url


def canonical_json(value: Any) -> str:
    """`value` as safe-stable-stringify writes it: sorted keys, no spaces, JS numbers."""
    if isinstance(value, dict):
        # JavaScript compares strings by UTF-16 code units; for ASCII keys that is Python's order.
        ascii_keys = all(key.isascii() for key in value)
        items = sorted(value.items()) if ascii_keys else sorted(value.items(), key=lambda item: _utf16(item[0]))
        return "{" + ",".join(f"{_string(k)}:{canonical_json(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, str):
        return _string(value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return js_number(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


_string = json.JSONEncoder(ensure_ascii=False).encode
"""A string as JSON, non-ASCII characters as they are (one encoder: `json.dumps` with options builds
one per call)."""


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-be")


def js_number(number: float) -> str:
    """`number` as JavaScript's `Number.prototype.toString` writes it."""
    if number != number or number in (float("inf"), float("-inf")):
        return "null"
    if number == 0:
        return "0"
    sign = "-" if number < 0 else ""
    digits_tuple, exponent = Decimal(repr(abs(float(number)))).normalize().as_tuple()[1:]
    digits = "".join(map(str, digits_tuple))
    k = len(digits)
    n = k + int(exponent)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * -n + digits
    else:
        mantissa = digits if k == 1 else digits[0] + "." + digits[1:]
        text = f"{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    return sign + text


def validate(definition: definition_pb2.JobDefinition) -> None:
    """Raise DefinitionError naming the first field that cannot work."""
    _check_shape(definition)
    for name in ("command", "entrypoint"):
        if definition.HasField(name):
            try:
                split_command(getattr(definition, name), definition.env)
            except ValueError as error:
                raise DefinitionError(f"`{name}`: {error}") from None
    _check_units(definition)
    _check_env(definition)
    check_files(definition)


def check_files(definition: definition_pb2.JobDefinition) -> None:
    """Raise DefinitionError naming the first input or config file whose path is not safe or whose
    reference is malformed: what a worker turns into paths and fetches (it checks no more than this
    of what the server sends, since the server checked the rest at submission)."""
    for path, ref in definition.inputs.items():
        check_relative_path(path, what="inputs")
        check_data_ref(ref, where=f"inputs[{path!r}]")
    for path, ref in definition.config_files.items():
        if not path.startswith("/"):
            check_relative_path(path, what="configFiles")
        elif "\0" in path or ".." in path.split("/"):
            raise DefinitionError(f"configFiles: invalid path {path!r}")
        check_data_ref(ref, where=f"configFiles[{path!r}]")
    if has_build(definition):
        _check_build(definition.build)


def _check_shape(definition: definition_pb2.JobDefinition) -> None:
    if not definition.image and not has_build(definition):
        raise DefinitionError("definition needs an `image` (or a `build`)")
    if (size := definition.ByteSize()) > MAX_DEFINITION_BYTES:
        raise DefinitionError(f"the definition is {size} bytes, over the {MAX_DEFINITION_BYTES} byte limit")


def _check_build(build: definition_pb2.ImageBuild) -> None:
    if not (build.dockerfile or build.context):
        raise DefinitionError("`build` needs a `dockerfile` or a `context`")
    for field, path in (("build.buildContext", build.build_context), ("build.filename", build.filename)):
        if path.removeprefix("./").rstrip("/") not in ("", "."):
            check_relative_path(path.removeprefix("./").rstrip("/"), what=field)


def _check_env(definition: definition_pb2.JobDefinition) -> None:
    for key in definition.env:
        if not key or "=" in key or "\0" in key:
            raise DefinitionError(f"env: invalid variable name {key!r}")


def _check_units(definition: definition_pb2.JobDefinition) -> None:
    checks = [
        (
            "maxDuration",
            definition.max_duration if definition.HasField("max_duration") else None,
            parse_duration,
        ),
        ("shmSize", definition.shm_size if definition.HasField("shm_size") else None, parse_size),
    ]
    requirements = definition.requirements
    if requirements.HasField("max_duration"):
        checks.append(("requirements.maxDuration", requirements.max_duration, parse_duration))
    if requirements.HasField("memory"):
        checks.append(("requirements.memory", requirements.memory, parse_size))
    for name, text, parse in checks:
        if text is None:
            continue
        try:
            parse(text)
        except ValueError as error:
            raise DefinitionError(f"`{name}`: {error}") from None


def check_relative_path(path: str, *, what: str) -> None:
    """Reject a file name that is empty, absolute, escapes its folder or holds NUL."""
    parts = path.split("/")
    if (
        not path
        or len(path) > MAX_PATH_LENGTH
        or "\0" in path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise DefinitionError(
            f"{what}: invalid file name {path!r} (a relative path like 'data/a.csv'; no '..', "
            "no leading '/', no empty parts)"
        )


def check_data_ref(ref: definition_pb2.DataRef, *, where: str) -> None:
    """Reject a data ref whose type is unknown or whose value does not fit its type."""
    kind = ref.type or "utf8"
    if kind not in DATA_REF_TYPES:
        raise DefinitionError(f"{where}: unknown type {ref.type!r} (one of {', '.join(sorted(DATA_REF_TYPES))})")
    if kind in ("base64", "utf8", "json") and (size := ref.value.ByteSize()) > MAX_INLINE_BYTES:
        raise DefinitionError(
            f"{where}: the inline value is {size} bytes, over the {MAX_INLINE_BYTES} byte limit;"
            " upload the file (PUT /f/{sha256}) and give a `key` ref"
        )
    if kind == "json":
        return
    if ref.value.WhichOneof("kind") != "string_value":
        raise DefinitionError(f"{where}: a {kind} value must be a string")
    value = ref.value.string_value
    if kind == "base64":
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            raise DefinitionError(f"{where}: value is not valid base64") from None
    elif kind == "url" and not re.match(r"^https?://", value):
        raise DefinitionError(f"{where}: a url value must start with http:// or https://")
    elif kind == "key":
        check_key(value, where=where)


def check_key(key: str, *, where: str = "key") -> None:
    """Reject a blob key that is not 1-128 of [A-Za-z0-9._-] (no leading dot)."""
    if not _KEY.match(key):
        raise DefinitionError(f"{where}: invalid blob key {key!r} (1-128 of A-Z a-z 0-9 . _ -, no leading dot)")


def is_sha256(key: str) -> bool:
    """True when `key` is a SHA-256 hex digest, so stored bytes must match it."""
    return _SHA256.match(key) is not None


def inline_bytes(ref: definition_pb2.DataRef) -> bytes:
    """The bytes of an inline data ref: base64 decoded, utf8 encoded, json compact (keys sorted)."""
    kind = ref.type or "utf8"
    if kind == "base64":
        return base64.b64decode(ref.value.string_value)
    if kind == "json":
        return canonical_json(json_format.MessageToDict(ref.value)).encode()
    return ref.value.string_value.encode()
