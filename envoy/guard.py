"""The request guard's Lua source: guard.lua behind tables generated from the descriptor set.

The tables say, for every `google.api.http` binding, which query parameters would override
the path or the body (refused), whether the body is JSON (its keys are checked against the
request message) or raw bytes, and which origins may call (None: any).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from importlib import resources

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

LuaValue = str | bool | int | list["LuaValue"] | dict[str, "LuaValue"] | None
_FieldType = descriptor_pb2.FieldDescriptorProto
_FREE = ".google.protobuf."  # well-known types: their JSON forms are taken as they come


def lua(value: LuaValue) -> str:
    """`value` as a Lua literal (dicts become tables with string keys, None is nil)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isalnum() or c in " _-./:^$()%[]*+?{}=" else f"\\{ord(c)}" for c in value) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua(item) for item in value) + "}"
    return "{" + ", ".join(f"[{lua(key)}] = {lua(item)}" for key, item in value.items()) + "}"


class _Descriptors:
    """Messages and HTTP rules of one descriptor set."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet) -> None:
        self.files = files
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        for file in files.file:
            for message in file.message_type:
                self._index(f".{file.package}", message)

    def _index(self, scope: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{scope}.{message.name}"
        self.messages[name] = message
        for nested in message.nested_type:
            self._index(name, nested)

    def bindings(self) -> Iterator[tuple[str, str, http_pb2.HttpRule]]:
        """(input type, gRPC path, rule) of every binding, additional ones included."""
        for file in self.files.file:
            for service in file.service:
                for method in service.method:
                    if method.options.HasExtension(annotations_pb2.http):
                        grpc_path = f"/{file.package}.{service.name}/{method.name}"
                        for rule in _flatten(method.options.Extensions[annotations_pb2.http]):
                            yield method.input_type, grpc_path, rule

    def schema(self, name: str, into: dict[str, LuaValue]) -> None:
        """Add message `name` and every message its JSON may hold to `into` (MESSAGES)."""
        if name[1:] in into:
            return
        fields: dict[str, LuaValue] = {}
        into[name[1:]] = fields
        for field in self.messages[name].field:
            fields[field.name] = fields[field.json_name] = self._node(field, into)

    def _node(self, field: descriptor_pb2.FieldDescriptorProto, into: dict[str, LuaValue]) -> LuaValue:
        if field.type != _FieldType.TYPE_MESSAGE or field.type_name.startswith(_FREE):
            return True
        message = self.messages[field.type_name]
        if message.options.map_entry:
            return {"__map": self._node(message.field[1], into)}
        self.schema(field.type_name, into)
        return field.type_name[1:]


def _flatten(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    yield rule
    for extra in rule.additional_bindings:
        yield from _flatten(extra)


_VARIABLE = re.compile(r"\{([a-z_.]+)(?:=([^}]*))?\}")


def _lua_literal(text: str) -> str:
    return re.sub(r"([\^$()%.\[\]*+\-?])", r"%\1", text)


def pattern(template: str) -> tuple[str, list[str]]:
    """A Lua pattern matching the paths of a path template, and the fields its variables bind."""
    bound: list[str] = []
    parts = []
    for segment in template.lstrip("/").split("/"):
        variable = _VARIABLE.fullmatch(segment)
        if variable is None:
            if "{" in segment or "*" in segment or ":" in segment:
                raise ValueError(f"path template {template!r}: segment {segment!r} is not supported")
            parts.append(_lua_literal(segment))
            continue
        name, shape = variable.group(1), variable.group(2) or "*"
        bound.append(name.split(".")[0])
        parts.append({"*": "([^/]+)", "**": "(.+)"}.get(shape) or f"({_lua_literal(shape)})")
    return "^/" + "/".join(parts) + "$", bound


def _route(descriptors: _Descriptors, input_type: str, grpc_path: str, rule: http_pb2.HttpRule) -> dict[str, LuaValue]:
    verb = rule.WhichOneof("pattern")
    assert verb is not None and verb != "custom", rule
    lua_pattern, bound = pattern(getattr(rule, verb))
    fields = {field.name: field for field in descriptors.messages[input_type].field}
    denied = bound + ([rule.body] if rule.body not in ("", "*") else [])
    deny: dict[str, LuaValue] = {}
    for name in denied:
        deny[name] = deny[fields[name].json_name] = True
    return {
        "verb": verb.upper(),
        "pattern": lua_pattern,
        "method": grpc_path,
        "deny": deny,
        "body": input_type[1:] if rule.body == "*" else None,
        "raw": rule.body not in ("", "*"),
    }


def source(allowed_origins: Sequence[str] | None) -> str:
    """The guard's whole Lua source for the packaged descriptor set and these origins."""
    descriptors = _Descriptors(descriptor_pb2.FileDescriptorSet.FromString(packaged_descriptor()))
    routes: list[LuaValue] = []
    messages: dict[str, LuaValue] = {}
    for input_type, grpc_path, rule in descriptors.bindings():
        route = _route(descriptors, input_type, grpc_path, rule)
        if rule.body == "*":
            descriptors.schema(input_type, messages)
        routes.append(route)
    origins: LuaValue = None if allowed_origins is None else dict.fromkeys(allowed_origins, True)
    tables = f"ROUTES = {lua(routes)}\nMESSAGES = {lua(messages)}\nORIGINS = {lua(origins)}\n"
    return tables + resources.files("jobwire.envoy").joinpath("guard.lua").read_text(encoding="utf-8")


def packaged_descriptor() -> bytes:
    """The descriptor set of jobwire.v1 installed with the package (what Envoy transcodes with)."""
    return resources.files("jobwire.v1").joinpath("jobwire.binpb").read_bytes()
