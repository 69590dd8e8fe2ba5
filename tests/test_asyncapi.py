"""The AsyncAPI document is generated from the message models: its payload schemas take the
messages the processes really send and refuse what they refuse."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import jsonschema_rs

from broker.client import make_job
from broker.core.asyncapi import asyncapi_document
from broker.core.codec import encode
from broker.core.names import Names
from schemas import JobQuery
from tests.conftest import REPO


def validator(document: dict[str, Any], message: str) -> Any:
    """A validator for one message's payload, its $refs resolved inside the document."""
    schema = {**document["components"], "$ref": f"#/messages/{message}/payload"}
    schema = json.loads(json.dumps(schema).replace("#/components/", "#/"))
    return jsonschema_rs.validator_for(schema)


def test_the_payload_schemas_take_real_messages_and_refuse_bad_ones() -> None:
    document = asyncapi_document(Names("prod"))
    assert document["asyncapi"] == "3.0.0"
    assert document["channels"]["jobs"]["address"] == "prod.jobs"
    assert document["channels"]["control"]["address"] == "prod.control"
    job = json.loads(encode(make_job([{"role": "user", "content": "hi"}], model="m", priority=3)))
    jobs = validator(document, "CompletionJob")
    assert jobs.is_valid(job)
    assert not jobs.is_valid({**job, "priority": 11})
    assert not jobs.is_valid({**job, "surprise": 1})  # extra="forbid" holds in the document
    query = validator(document, "JobQuery")
    assert query.is_valid(json.loads(JobQuery(op="cancel", job_id="j").model_dump_json()))
    assert not query.is_valid({"op": "delete", "job_id": "j"})
    results = validator(document, "JobResult")
    assert results.is_valid(
        {
            "job_id": "j",
            "status": "cancelled",
            "error": {
                "type": "cancelled",
                "code": "cancelled",
                "message": "cancelled before its call",
            },
        }
    )


def test_switchyard_asyncapi_writes_the_same_document(tmp_path: Any) -> None:
    out = tmp_path / "asyncapi.json"
    env = {"SWITCHYARD_NAMESPACE": "prod", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "broker.cli", "asyncapi", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads(json.dumps(asyncapi_document(Names("prod"))))
