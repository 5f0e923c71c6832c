"""Write the REST API's OpenAPI 2.0 document from the protos' google.api.http annotations.

    python scripts/openapi.py OUT.json PROTO...      (run by `make gen`)

Follows grpc-gateway's rules (its protoc-gen-swagger makes the same paths; a test checks):
path variables bind request fields, `body: "*"` takes the remaining fields from a JSON body,
`body: "field"` that field, every other non-message field is a query parameter. Bodies use
the proto3 JSON mapping as Envoy prints it (camelCase, 64-bit integers as strings, enums by
name). A variable that matches only literals (`{file=run-logs.json}`) is written out as the
literal path it matches; `{path=**}` becomes `{path}` and may contain slashes.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

import jobwire

FDP = descriptor_pb2.FieldDescriptorProto
HTTP_BODY = "google.api.HttpBody"
SCALARS: dict[int, dict[str, str]] = {
    FDP.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FDP.TYPE_FLOAT: {"type": "number", "format": "float"},
    FDP.TYPE_INT64: {"type": "string", "format": "int64"},
    FDP.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FDP.TYPE_INT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FDP.TYPE_FIXED32: {"type": "integer", "format": "int64"},
    FDP.TYPE_BOOL: {"type": "boolean"},
    FDP.TYPE_STRING: {"type": "string"},
    FDP.TYPE_BYTES: {"type": "string", "format": "byte"},
    FDP.TYPE_UINT32: {"type": "integer", "format": "int64"},
    FDP.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FDP.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FDP.TYPE_SINT64: {"type": "string", "format": "int64"},
}
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "description": "Seconds with an `s` suffix, e.g. `1.5s`."},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    HTTP_BODY: {"type": "string", "format": "binary"},
}
ERROR = {
    "type": "object",
    "description": "A gRPC status as Envoy's transcoder prints it.",
    "properties": {
        "code": {"type": "integer", "format": "int32", "description": "The gRPC status code."},
        "message": {"type": "string"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
}
VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")


class Protos:
    """The messages, enums and comments of a descriptor set with source info."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = list(files.file)
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        for file in self.files:
            locations = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
            for index, message in enumerate(file.message_type):
                self._message(f"{file.package}.{message.name}", message, (4, index), locations)
            for index, enum in enumerate(file.enum_type):
                self._enum(f"{file.package}.{enum.name}", enum, (5, index), locations)
            for s_index, service in enumerate(file.service):
                name = f"{file.package}.{service.name}"
                self.comments[name] = _clean(locations.get((6, s_index), ""))
                for m_index, method in enumerate(service.method):
                    self.comments[f"{name}.{method.name}"] = _clean(locations.get((6, s_index, 2, m_index), ""))

    def _message(
        self, name: str, message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], locations: dict[Any, str]
    ) -> None:
        self.messages[name] = message
        self.comments[name] = _clean(locations.get(path, ""))
        for index, field in enumerate(message.field):
            self.comments[f"{name}.{field.name}"] = _clean(locations.get((*path, 2, index), ""))
        for index, nested in enumerate(message.nested_type):
            self._message(f"{name}.{nested.name}", nested, (*path, 3, index), locations)
        for index, enum in enumerate(message.enum_type):
            self._enum(f"{name}.{enum.name}", enum, (*path, 4, index), locations)

    def _enum(
        self, name: str, enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], locations: dict[Any, str]
    ) -> None:
        self.enums[name] = enum
        lines = [_clean(locations.get(path, ""))]
        for index, value in enumerate(enum.value):
            lines.append(f"- `{value.name}`: {_clean(locations.get((*path, 2, index), ''))}")
        self.comments[name] = "\n".join(lines)


class Document:
    """Builds the OpenAPI document: paths from the HTTP rules, definitions on demand."""

    def __init__(self, protos: Protos) -> None:
        self.protos = protos
        self.definitions: dict[str, Any] = {"Status": ERROR}
        self.paths: dict[str, dict[str, Any]] = {}
        self.operation_ids: set[str] = set()

    def build(self) -> dict[str, Any]:
        tags = []
        for file in self.protos.files:
            for service in file.service:
                full = f"{file.package}.{service.name}"
                annotated = [m for m in service.method if m.options.HasExtension(annotations_pb2.http)]
                if annotated:
                    tags.append({"name": service.name, "description": self.protos.comments[full]})
                for method in annotated:
                    for rule in _rules(method.options.Extensions[annotations_pb2.http]):
                        self._operation(service.name, full, method, rule)
        return {
            "swagger": "2.0",
            "info": {
                "title": "jobwire REST API",
                "version": jobwire.__version__,
                "description": "Transcoded by Envoy from the gRPC API in proto/jobwire/v1 (`make gen` writes this).",
            },
            "tags": tags,
            "consumes": ["application/json"],
            "produces": ["application/json"],
            "paths": self.paths,
            "definitions": dict(sorted(self.definitions.items())),
        }

    def _operation(
        self, service: str, full: str, method: descriptor_pb2.MethodDescriptorProto, rule: http_pb2.HttpRule
    ) -> None:
        verb = rule.WhichOneof("pattern")
        template = rule.custom.path if verb == "custom" else getattr(rule, verb)
        verb = rule.custom.kind.lower() if verb == "custom" else verb
        path, path_fields, fixed = _path(template)
        request = self.protos.messages[method.input_type.lstrip(".")]
        operation: dict[str, Any] = {
            "operationId": self._operation_id(f"{service}_{method.name}"),
            "summary": _summary(self.protos.comments[f"{full}.{method.name}"]),
            "description": self.protos.comments[f"{full}.{method.name}"],
            "tags": [service],
            "parameters": self._parameters(request, path_fields, fixed, rule.body),
            "responses": self._responses(method),
        }
        if (
            method.client_streaming
            or method.input_type.lstrip(".") == HTTP_BODY
            or (rule.body and _body_is_raw(self.protos, request, rule.body))
        ):
            operation["consumes"] = ["application/octet-stream"]
        if _returns_body(method):
            operation["produces"] = ["*/*"]
        self.paths.setdefault(path, {})[verb] = operation

    def _operation_id(self, base: str) -> str:
        name, number = base, 1
        while name in self.operation_ids:
            number += 1
            name = f"{base}{number}"
        self.operation_ids.add(name)
        return name

    def _parameters(
        self, request: descriptor_pb2.DescriptorProto, path_fields: list[str], fixed: dict[str, str], body: str
    ) -> list[dict[str, Any]]:
        name = _full_name(self.protos, request)
        fields = {field.name: field for field in request.field}
        parameters: list[dict[str, Any]] = []
        for field_name in path_fields:
            parameters.append(
                {
                    "name": field_name,
                    "in": "path",
                    "required": True,
                    "type": "string",
                    "description": self.protos.comments.get(f"{name}.{field_name}", ""),
                }
            )
        bound = set(path_fields) | set(fixed)
        if body == "*":
            rest = [f for f in request.field if f.name not in bound]
            schema = {"type": "object", "properties": {f.json_name: self._field(name, f) for f in rest}}
            parameters.append({"name": "body", "in": "body", "required": True, "schema": schema})
            return parameters
        if body:
            parameters.append(
                {"name": "body", "in": "body", "required": True, "schema": self._field(name, fields[body])}
            )
            bound.add(body)
        for field in request.field:
            if field.name in bound or field.type == FDP.TYPE_MESSAGE:
                continue
            parameter = {"name": field.json_name, "in": "query", "required": False, **self._query_type(field)}
            parameter["description"] = self.protos.comments.get(f"{name}.{field.name}", "")
            parameters.append(parameter)
        return parameters

    def _query_type(self, field: FDP) -> dict[str, Any]:
        if field.type == FDP.TYPE_ENUM:
            item: dict[str, Any] = {"type": "string", "enum": self._enum_values(field.type_name)}
        else:
            item = dict(SCALARS[field.type])
        if field.label == FDP.LABEL_REPEATED:
            return {"type": "array", "items": item, "collectionFormat": "multi"}
        return item

    def _responses(self, method: descriptor_pb2.MethodDescriptorProto) -> dict[str, Any]:
        output = method.output_type.lstrip(".")
        schema = self._ref(output)
        if method.server_streaming and output != HTTP_BODY:
            schema = {"type": "array", "items": schema}
            description = "A stream of messages, printed as one JSON array as they come."
        elif output == HTTP_BODY:
            description = "Raw bytes; the content type is set by the server (streamed when the RPC streams)."
        else:
            description = "A successful response."
        return {
            "200": {"description": description, "schema": schema},
            "default": {
                "description": "An error: 400 invalid input, 404 not found, 409 conflict.",
                "schema": self._ref("Status"),
            },
        }

    def _field(self, owner: str, field: FDP) -> dict[str, Any]:
        description = self.protos.comments.get(f"{owner}.{field.name}", "")
        message = self.protos.messages.get(field.type_name.lstrip("."))
        if message is not None and message.options.map_entry:
            value = self._field(field.type_name.lstrip("."), message.field[1])
            return {"type": "object", "additionalProperties": value, "description": description}
        if field.type == FDP.TYPE_MESSAGE or field.type == FDP.TYPE_ENUM:
            item = self._ref(field.type_name.lstrip("."))
        else:
            item = dict(SCALARS[field.type])
        if field.label == FDP.LABEL_REPEATED:
            item = {"type": "array", "items": item}
        if "$ref" in item:
            return {"allOf": [item], "description": description} if description else item
        return {**item, "description": description}

    def _ref(self, name: str) -> dict[str, Any]:
        if name in WELL_KNOWN:
            return dict(WELL_KNOWN[name])
        if name not in self.definitions:
            self.definitions[name] = {}
            self.definitions[name] = self._definition(name)
        return {"$ref": f"#/definitions/{name}"}

    def _definition(self, name: str) -> dict[str, Any]:
        if name in self.protos.enums:
            return {"type": "string", "enum": self._enum_values(name), "description": self.protos.comments[name]}
        message = self.protos.messages[name]
        properties = {field.json_name: self._field(name, field) for field in message.field}
        return {"type": "object", "description": self.protos.comments[name], "properties": properties}

    def _enum_values(self, type_name: str) -> list[str]:
        return [value.name for value in self.protos.enums[type_name.lstrip(".")].value]


def _rules(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    for extra in rule.additional_bindings:
        yield from _rules(extra)


def _path(template: str) -> tuple[str, list[str], dict[str, str]]:
    """The OpenAPI path of a template, its path fields, and the fields fixed by literal-only variables."""
    fields: list[str] = []
    fixed: dict[str, str] = {}

    def variable(match: re.Match[str]) -> str:
        name, pattern = match.group(1), match.group(2)
        if pattern and "*" not in pattern:
            fixed[name] = pattern
            return pattern
        fields.append(name)
        return "{" + name + "}"

    return VARIABLE.sub(variable, template), fields, fixed


def _full_name(protos: Protos, message: descriptor_pb2.DescriptorProto) -> str:
    return next(name for name, candidate in protos.messages.items() if candidate is message)


def _body_is_raw(protos: Protos, request: descriptor_pb2.DescriptorProto, body: str) -> bool:
    field = next((f for f in request.field if f.name == body), None)
    return field is not None and field.type_name.lstrip(".") == HTTP_BODY


def _returns_body(method: descriptor_pb2.MethodDescriptorProto) -> bool:
    return method.output_type.lstrip(".") == HTTP_BODY


def _summary(comment: str) -> str:
    """The first sentence of a comment, on one line."""
    return comment.replace("\n", " ").split(". ")[0].rstrip(".") + "."


def _clean(comment: str) -> str:
    lines = [line.removeprefix(" ") for line in comment.strip("\n").split("\n")]
    return "\n".join(line for line in lines if not line.startswith("buf:lint:")).strip()


def descriptor_set(protos: list[str], includes: list[str]) -> descriptor_pb2.FileDescriptorSet:
    """Compile the protos with imports and comments."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "set.binpb"
        args = ["protoc", *(f"-I{i}" for i in includes), "--include_imports", "--include_source_info"]
        if protoc.main([*args, f"--descriptor_set_out={out}", *protos]) != 0:
            raise SystemExit("protoc failed")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def main(argv: list[str]) -> None:
    out, protos = argv[0], argv[1:]
    well_known = str(resources.files("grpc_tools") / "_proto")
    document = Document(Protos(descriptor_set(protos, ["proto", "third_party/googleapis", well_known]))).build()
    Path(out).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
