"""The job id matches the seed's test vectors; bad definitions are refused clearly."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from jobwire.cli.submission import submit_options
from jobwire.client import _definition
from jobwire.core.command import split_command
from jobwire.core.definition import DefinitionError, canonical_json, has_build, job_id, js_number, shown, validate
from jobwire.core.units import parse_duration, parse_size
from jobwire.v1 import definition_pb2


def parse(payload: dict[str, object]) -> definition_pb2.JobDefinition:
    return json_format.ParseDict(payload, definition_pb2.JobDefinition())


SEED_VECTORS = [
    (
        {"image": "alpine:3.18.5", "command": "ls"},
        "74202ec00eefff2982ef0a51077ce7f28d4a51e5bbee46ede2321455a4d83923",
    ),
    (
        {"command": 'echo "hello world"', "image": "alpine:3.19.1"},
        "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873",
    ),
    (
        {
            "image": "alpine:latest",
            "command": "echo hello",
            "inputs": {"file1": {"value": "some data", "type": "utf8", "hash": "x"}},
        },
        "e57a0594623a986212185099462e8abedf5756ca1cdff572df5b0ad84c322c35",
    ),
]
"""The seed's job-id test vectors (seed-spec.md §3): (definition, id)."""


@pytest.mark.parametrize(("payload", "expected"), SEED_VECTORS)
def test_seed_vectors(payload: dict[str, object], expected: str) -> None:
    assert job_id(parse(payload)) == expected


def test_empty_records_and_injected_env_hash_as_absent() -> None:
    plain = job_id(parse({"image": "a", "command": "ls"}))
    noisy = {
        "image": "a",
        "command": "ls",
        "env": {"mp-x": "1", "channel": "c"},
        "inputs": {},
        "build": {},
    }
    assert job_id(parse(noisy)) == plain
    assert job_id(parse({"image": "a", "command": "ls", "env": {"K": "1"}})) != plain


def test_canonical_json_matches_javascript() -> None:
    assert canonical_json({"b": 1.0, "a": [True, None, "é\n"]}) == '{"a":[true,null,"é\\n"],"b":1}'
    assert [js_number(x) for x in (1e21, 1e20, 1e-7, 0.00001, 1.5, -2.0, 123456789.125)] == [
        "1e+21",
        "100000000000000000000",
        "1e-7",
        "0.00001",
        "1.5",
        "-2",
        "123456789.125",
    ]


def test_split_command_follows_the_seed() -> None:
    assert split_command("sh -c 'sleep 1 && ls -a'", {}) == ["sh", "-c", "sleep 1 && ls -a"]
    assert split_command("echo $FOO", {"FOO": "bar"}) == ["echo", "bar"]
    assert split_command("echo ${BAR}x", {}) == ["echo", "x"]
    assert split_command("echo hi > /outputs/x", {}) == ["echo hi > /outputs/x"]
    assert split_command("ls *.txt", {}) == ["ls *.txt"]
    assert split_command('echo "a b" c\\ d', {}) == ["echo", "a b", "c d"]
    with pytest.raises(ValueError, match="closing quotation"):
        split_command("echo 'oops", {})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"command": "ls"}, "needs an `image`"),
        ({"image": "a", "inputs": {"../x": {"type": "utf8", "value": "v"}}}, "invalid file name"),
        ({"image": "a", "inputs": {"/etc/x": {"type": "utf8", "value": "v"}}}, "invalid file name"),
        (
            {"image": "a", "inputs": {"a\u0000b": {"type": "utf8", "value": "v"}}},
            "invalid file name",
        ),
        ({"image": "a", "inputs": {"x": {"type": "zip", "value": "v"}}}, "unknown type"),
        ({"image": "a", "inputs": {"x": {"type": "base64", "value": "!!"}}}, "not valid base64"),
        ({"image": "a", "maxDuration": "forever"}, "not a duration"),
        ({"image": "a", "command": "echo 'x"}, "closing quotation"),
        ({"build": {"target": "x"}}, "needs a `dockerfile`"),
    ],
)
def test_invalid_definitions(payload: dict[str, object], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        validate(parse(payload))


def test_valid_nested_inputs_pass() -> None:
    validate(parse({"image": "a", "inputs": {"a/b/c.txt": {"type": "utf8", "value": "v"}}}))


def test_units() -> None:
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1500") == 1.5
    assert parse_size("2g") == 2 * 1024**3
    assert parse_size("1GB") == 1024**3
    assert parse_size("512m") == 512 * 1024**2


def test_an_empty_build_is_no_build() -> None:
    """`build: {}` hashes as absent (the seed's vector) and runs the image."""
    definition = parse({"image": "alpine:3.18.5", "command": "ls", "build": {}})
    validate(definition)
    assert job_id(definition) == SEED_VECTORS[0][1]
    assert not has_build(definition)


def test_a_context_token_is_no_part_of_the_id_nor_of_what_is_shown() -> None:
    repository = "https://github.com/owner/repo/tree/v1.2.3"
    secret = "x-access-token:ghp_s3cret@"
    with_token = parse({"build": {"context": repository.replace("//", f"//{secret}")}})
    url_input = {"type": "url", "value": "https://user:pw@files.example/a.csv"}
    with_token.inputs["a.csv"].CopyFrom(json_format.ParseDict(url_input, definition_pb2.DataRef()))
    assert job_id(with_token) == job_id(parse({"build": {"context": repository}, "inputs": {"a.csv": url_input}}))
    visible = json_format.MessageToJson(shown(with_token))
    assert "s3cret" not in visible and "pw" not in visible and "files.example/a.csv" in visible
    assert with_token.build.context.startswith(f"https://{secret}")  # the stored one keeps it for the worker


def test_git_flag_builds_from_the_repository() -> None:
    """`jobwire job add --git URL`: the repository is the build context, and no default image is added."""
    repository = "https://github.com/owner/repo/tree/v1.2.3"
    options = submit_options(None, "", None, "cat /ref.txt", None, None, None, None, None, repository)
    assert "image" not in options
    built = _definition(None, options)
    validate(built)
    assert (built.build.context, built.HasField("image")) == (repository, False)


def test_queue_names_and_credentials_never_start_with_a_dash() -> None:
    """They stand as command-line arguments, also after an option (`--credential TOKEN`)."""
    from jobwire.core import tokens

    made = [tokens.token(24) for _ in range(2000)]  # about 31 would start with `-` from token_urlsafe
    assert not [value for value in made if value.startswith("-")]
    assert {len(value) for value in made} == {32}
