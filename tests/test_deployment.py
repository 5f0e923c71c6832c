"""The reference deployment (deploy/): its Envoy config is current and valid, its commands are real CLI calls.

No registry is reachable here, so the compose file is not run; these checks keep it
consistent with the code it deploys.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import trustme
import yaml

from jobwire.cli.app import app
from jobwire.cli.services import descriptor_path
from jobwire.envoy import config as envoy_config
from jobwire.envoy import tls

DEPLOY = Path(__file__).parent.parent / "deploy"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def jobwire_services(command: str) -> list[str]:
    """Names of the compose services that run `jobwire COMMAND`."""
    services = compose()["services"]
    return [
        name
        for name, service in services.items()
        if service.get("image", "").startswith("jobwire") and service.get("command", [None])[0] == command
    ]


def test_deploy_envoy_config_is_the_rendered_template() -> None:
    committed = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    assert committed == envoy_config.deployment(), "deploy/envoy.yaml is stale: run `make deploy-envoy`"
    secret = yaml.safe_load((DEPLOY / "envoy-tls.yaml").read_text())
    assert secret == envoy_config.deployment_secret(), "deploy/envoy-tls.yaml is stale: run `make deploy-envoy`"


def test_deploy_image_holds_what_envoy_reads() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"COPY deploy/envoy-tls.yaml {envoy_config.DEPLOYMENT_SECRET}" in dockerfile
    # Every package folder pyproject maps is copied in, or `pip install .` fails in the build.
    for folder in ("sdk", "core", "server", "worker", "cli", "envoy", "agents", "gen"):
        assert f"COPY {folder} {folder}" in dockerfile
    certificates = Path(envoy_config.DEPLOYMENT_CERTIFICATE[0]).parent
    assert f"./tls:{certificates}:ro" in compose()["services"]["envoy"]["volumes"]


def test_deploy_envoy_config_is_accepted_by_envoy(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    envoy_config.transcoder_config(config)["proto_descriptor"] = str(descriptor_path())
    # The image's secret file, pointed at a certificate of a test CA (Envoy reads it when validating).
    issued = trustme.CA().issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    secret = envoy_config.write(tls.secret(tmp_path / "cert.pem", tmp_path / "key.pem"), tmp_path / "tls.yaml")
    (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
    sds = chain["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificate_sds_secret_configs"]
    assert sds[0]["sds_config"]["path_config_source"]["path"] == envoy_config.DEPLOYMENT_SECRET
    sds[0]["sds_config"]["path_config_source"]["path"] = str(secret)
    path = envoy_config.write(config, tmp_path / "envoy.yaml")
    result = subprocess.run(
        [envoy_config.envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_three_replicas_on_postgres_and_s3_behind_envoy() -> None:
    services = compose()["services"]
    replicas = jobwire_services("server")
    assert sorted(replicas) == sorted(envoy_config.DEPLOYMENT_REPLICAS)
    for name in replicas:
        command = services[name]["command"]
        assert any(arg.startswith("--database=postgresql://") for arg in command)
        assert any(arg.startswith("--blobs=s3://") for arg in command)
    workers = jobwire_services("worker")
    assert len(workers) >= 2
    data = [arg for name in workers for arg in services[name]["command"] if arg.startswith("--data-directory=")]
    assert len(set(data)) == len(workers), "each worker needs a data directory (and so an id) of its own"


def test_compose_commands_are_valid_cli_calls() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if service.get("image", "").startswith("jobwire") and command:
            # Raises on an unknown option or a bad value, as `jobwire` itself would.
            app.parse_args(command, exit_on_error=False, print_error=False)
            assert name
