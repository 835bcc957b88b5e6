"""The OpenAPI 3.1 document of the coordinator's HTTP API.

The schemas come from the pydantic models that the API serializes, so the document
cannot drift from the wire format. `scripts/write-openapi.py` writes it to
docs/openapi.yaml, and a test checks that the committed file is this document.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from fairu import __version__
from fairu.protocol.evaluation import (
    EvaluationRequest,
    EvaluationStatus,
    EvaluationSummary,
)
from fairu.protocol.models import Envelope, GpuInfo, ResourceAmounts

from .api import API_PREFIX, DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, MAX_BODY_BYTES

SCHEMA_REF = "#/components/schemas/{model}"


class _Described(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorDetail(_Described):
    # A machine-readable error code, such as bad_signature or unknown_evaluation.
    code: str
    message: str


class ErrorBody(_Described):
    """The body of every error response."""

    error: ErrorDetail


class Health(_Described):
    status: Literal["ok"]


class GpuCount(_Described):
    free: Annotated[int, Field(ge=0)]
    total: Annotated[int, Field(ge=0)]


class HostInfo(_Described):
    """Host facts from the agent's last registration."""

    usable_cpus: float | None = None
    memory_available_bytes: int | None = None
    scratch_free_bytes: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None


class FleetAgent(_Described):
    """One registered agent, as `fairu-admin agents list --json` prints it."""

    agent_id: str
    site: str
    public_key: str
    version: str
    cpu_cores: Annotated[int, Field(ge=0)]
    memory_bytes: Annotated[int, Field(ge=0)]
    gpus: list[GpuInfo]
    queues: list[str]
    slots: Annotated[int, Field(ge=0)]
    # The state the agent reported last: starting, serving, draining or stopped.
    state: str
    free_slots: Annotated[int, Field(ge=0)]
    running_jobs: list[str]
    registered_at: str
    last_seen: str
    approval: Literal["pending", "approved", "revoked"]
    heartbeat_interval_s: float
    capacity: ResourceAmounts | None
    free: ResourceAmounts | None
    host: HostInfo
    liveness: Literal["live", "stale", "offline"]
    # The reported state, or stale or offline when heartbeats stopped arriving.
    fleet_state: str
    gpus_by_model: dict[str, GpuCount]


def _json(schema: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": SCHEMA_REF.format(model=schema)}}},
    }


def _json_list(schema: str, description: str) -> dict[str, Any]:
    items = {"$ref": SCHEMA_REF.format(model=schema)}
    return {
        "description": description,
        "content": {"application/json": {"schema": {"type": "array", "items": items}}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json("ErrorBody", description)


# Every evaluation endpoint responds with 503 on a coordinator started without --keys-dir.
DISABLED = "the coordinator runs no evaluations"

EVALUATION_ID = {
    "name": "evaluation_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
}
ARTIFACT_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "a file name, such as coverage.png or report.html",
    "schema": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
}


def _paths() -> dict[str, Any]:
    evaluations = f"{API_PREFIX}/evaluations"
    return {
        "/": {
            "get": {
                "operationId": "page",
                "summary": "The organizer page: the fleet and the evaluations",
                "description": "Static HTML whose script reads the JSON endpoints.",
                "responses": {
                    "200": {
                        "description": "the page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Report that the coordinator is serving",
                "responses": {"200": _json("Health", "the coordinator is serving")},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document, as JSON",
                "responses": {
                    "200": {
                        "description": "the OpenAPI document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        evaluations: {
            "post": {
                "operationId": "submitEvaluation",
                "summary": "Submit an evaluation request signed by an organizer",
                "description": (
                    "The body is the signed envelope JSON of an EvaluationRequest, "
                    "as `fairu-admin evaluate` makes it: the payload is signed by a "
                    "job-signing key whose certificate the root key issued. At most "
                    f"{MAX_BODY_BYTES} bytes."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": SCHEMA_REF.format(model="Envelope")}
                        }
                    },
                },
                "responses": {
                    "201": _json("EvaluationStatus", "the evaluation was accepted"),
                    "400": _error("the envelope or the request is invalid"),
                    "403": _error(
                        "the signature, certificate or key is not trusted, or the "
                        "request came from another origin"
                    ),
                    "409": _error("an evaluation with this id exists"),
                    "413": _error("the body is larger than the limit"),
                    "503": _error(
                        "the broker or the coordinator's keys cannot be used now, or "
                        f"{DISABLED}"
                    ),
                },
            },
            "get": {
                "operationId": "listEvaluations",
                "summary": "List every evaluation",
                "responses": {
                    "200": _json_list("EvaluationSummary", "the evaluations"),
                    "503": _error(DISABLED),
                },
            },
        },
        f"{evaluations}/{{evaluation_id}}": {
            "get": {
                "operationId": "showEvaluation",
                "summary": "Show an evaluation with each shard",
                "parameters": [EVALUATION_ID],
                "responses": {
                    "200": _json("EvaluationStatus", "the evaluation"),
                    "404": _error("no evaluation has this id"),
                    "503": _error(DISABLED),
                },
            }
        },
        f"{evaluations}/{{evaluation_id}}/cancel": {
            "post": {
                "operationId": "cancelEvaluation",
                "summary": "Cancel an evaluation and its queued and running shards",
                "description": (
                    "An evaluation that already ended is returned unchanged."
                ),
                "parameters": [EVALUATION_ID],
                "responses": {
                    "200": _json("EvaluationStatus", "the evaluation after the cancel"),
                    "403": _error("the request came from another origin"),
                    "404": _error("no evaluation has this id"),
                    "503": _error(DISABLED),
                },
            }
        },
        f"{evaluations}/{{evaluation_id}}/artifacts/{{name}}": {
            "get": {
                "operationId": "getArtifact",
                "summary": "Download one result artifact of an evaluation",
                "description": (
                    "Served with the media type of its extension (image/png, "
                    "text/html, application/json) and a sandboxing "
                    "Content-Security-Policy."
                ),
                "parameters": [EVALUATION_ID, ARTIFACT_NAME],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            "*/*": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    "400": _error("the name is not a plain file name"),
                    "404": _error("no such evaluation or artifact"),
                    "503": _error(DISABLED),
                },
            }
        },
        f"{API_PREFIX}/agents": {
            "get": {
                "operationId": "listAgents",
                "summary": "List the fleet: every registered agent and its state",
                "responses": {"200": _json_list("FleetAgent", "the agents")},
            }
        },
    }


@cache
def _schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [
            (Envelope, "validation"),
            (EvaluationRequest, "validation"),
            (EvaluationSummary, "serialization"),
            (EvaluationStatus, "serialization"),
            (FleetAgent, "serialization"),
            (ErrorBody, "serialization"),
            (Health, "serialization"),
        ],
        ref_template=SCHEMA_REF,
    )
    return dict(sorted(top["$defs"].items()))


def openapi_document() -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of the API, as a fresh dictionary."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fairu coordinator API",
            "version": __version__,
            "description": (
                "Evaluations, their shards and artifacts, and the fleet of agents. "
                "The payload of a submission's envelope is the base64 of an "
                "EvaluationRequest's JSON. The API has no authentication of its own "
                "and listens on loopback by default (docs/api.md). While it listens on "
                "loopback, a request whose Host header is not a loopback name gets "
                "421, and a POST whose Origin header is another origin gets 403."
            ),
        },
        "servers": [{"url": f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_HTTP_PORT}"}],
        "paths": _paths(),
        "components": {"schemas": _schemas()},
    }
