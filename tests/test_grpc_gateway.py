"""grpc-gateway's own generators (Debian's golang-grpc-gateway) accept the proto's HTTP rules.

The plugins get a CodeGeneratorRequest built here rather than through protoc: protoc refuses
to hand proto3 `optional` fields to plugins as old as Debian's (1.6.4), though the plugins
read them fine. grpc-gateway rejects one rule, by design: a path parameter on a
client-streaming RPC (`PUT /f/{key}` on UploadFile), which Envoy's transcoder serves (the
key arrives in the first message). Everything else must generate, with the same paths as
the published OpenAPI document.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

from jobwire.cli.services import descriptor_path
from jobwire.server.servicers.server import openapi_document

STREAMED_UPLOAD = "cannot use path parameter in client streaming"


def generate(plugin: str, parameter: str, *, without_upload_rule: bool) -> plugin_pb2.CodeGeneratorResponse:
    binary = shutil.which(plugin)
    if binary is None:
        pytest.fail(f"{plugin} missing; `make browser` installs golang-grpc-gateway (as `make test` does)")
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path().read_bytes())
    request = plugin_pb2.CodeGeneratorRequest(parameter=parameter, proto_file=files.file)
    request.file_to_generate.extend(f.name for f in files.file if f.name.startswith("jobwire/"))
    if without_upload_rule:
        for file in request.proto_file:
            for service in file.service:
                for method in service.method:
                    if (service.name, method.name) == ("FileService", "UploadFile"):
                        method.options.ClearExtension(annotations_pb2.http)
    done = subprocess.run([binary], input=request.SerializeToString(), capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return plugin_pb2.CodeGeneratorResponse.FromString(done.stdout)


@pytest.mark.parametrize(
    ("plugin", "parameter"), [("protoc-gen-swagger", ""), ("protoc-gen-grpc-gateway", "logtostderr=true")]
)
def test_grpc_gateway_accepts_every_rule_but_the_streamed_upload(plugin: str, parameter: str) -> None:
    assert generate(plugin, parameter, without_upload_rule=False).error == STREAMED_UPLOAD
    response = generate(plugin, parameter, without_upload_rule=True)
    assert response.error == ""
    assert {"jobwire/v1/jobs", "jobwire/v1/files", "jobwire/v1/server"} <= {f.name.split(".")[0] for f in response.file}


def test_grpc_gateway_swagger_has_the_published_paths() -> None:
    response = generate("protoc-gen-swagger", "allow_merge=true", without_upload_rule=True)
    (merged,) = response.file
    theirs = {(verb, path) for path, ops in json.loads(merged.content)["paths"].items() for verb in ops}
    ours = {(verb, path) for path, ops in json.loads(openapi_document())["paths"].items() for verb in ops}
    # Ours writes literal-only variables out (`/j/{job_id}/run-logs.json`); theirs keeps `{file}`.
    normalised = {
        (verb, path.replace("run-logs.json", "{file}").replace("build-logs.json", "{file}")) for verb, path in ours
    }
    assert normalised - {("put", "/f/{key}")} == theirs
