"""One place for what every endpoint does: authenticate, validate, run the service call in
one transaction, shape the answer, turn errors into one JSON shape — and describe itself in
the OpenAPI document, from the same pydantic models that validate it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError, IntegrityError
from werkzeug.exceptions import HTTPException

from wallet_service.auth import Principal, authenticate
from wallet_service.errors import DomainError, InvalidInput, NotFound
from wallet_service.http_server import BodyRefused, json_answer, request_body
from wallet_service.services.registry import Context

log = logging.getLogger(__name__)
request_body_bytes_max = 2_000_000


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


@dataclass
class Operation:
    rule: str
    method: str
    summary: str
    roles: tuple[str, ...]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    response: type[BaseModel] | None
    status: int
    tag: str
    idempotent: bool
    media_type: str = "application/json"
    signed_webhook: bool = False  # authenticated by a Standard Webhooks signature, not a token


OPERATIONS: list[Operation] = []


@dataclass(frozen=True)
class SignedWebhook:
    """An endpoint authenticated by its Standard Webhooks signature: ``view(ctx,
    raw_body=, headers=)``, run as ``Database.run(…, one_statement)``."""

    view: Callable[..., Any]
    one_statement: bool
    status: int


SIGNED_WEBHOOKS: dict[str, SignedWebhook] = {}  # full path → its endpoint


def endpoint(
    blueprint: Blueprint,
    rule: str,
    method: str,
    *,
    summary: str,
    roles: tuple[str, ...],
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    idempotent: bool = False,
    media_type: str = "application/json",
    signed_webhook: bool = False,
    one_statement: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``view(ctx, body=..., query=..., **path) -> pydantic model or (status, JSON)``.
    ``one_statement``: the view's database work is one statement (``Database.run``)."""

    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        full_rule = (blueprint.url_prefix or "") + rule
        OPERATIONS.append(
            Operation(
                full_rule,
                method,
                summary,
                roles,
                body,
                query,
                response,
                status,
                blueprint.name,
                idempotent,
                media_type,
                signed_webhook,
            )
        )

        if signed_webhook:
            SIGNED_WEBHOOKS[full_rule] = SignedWebhook(view, one_statement, status)

        def handle(**path: Any) -> Response:
            if signed_webhook:  # (reached when ``SignedWebhooksFirst`` is not installed)
                app = current_app._get_current_object()  # type: ignore[attr-defined]
                webhook = SIGNED_WEBHOOKS[full_rule]
                raw, headers = request.get_data(cache=True), dict(request.headers)
                return _json(run_signed_webhook(app, webhook, raw, headers), status)
            if any(isinstance(v, int) and v > path_integer_max for v in path.values()):
                raise NotFound("no such resource")
            parsed_body = _parse_body(body) if body else None
            parsed_query = _parse_query(query) if query else None
            database = current_app.extensions["database"]

            def work(session):  # type: ignore[no-untyped-def]
                principal = authenticate(session, request.headers.get("Authorization"))
                principal.require(*roles)
                ctx = context_for(current_app, session, principal)
                kwargs: dict[str, Any] = dict(path)
                if body:
                    kwargs["body"] = parsed_body
                if query:
                    kwargs["query"] = parsed_query
                return view(ctx, **kwargs)

            answer = database.run(work, one_statement)
            if isinstance(answer, Response):  # streamed (CSV): the view built it
                return answer
            if isinstance(answer, tuple):
                code, payload = answer
                return _json(payload, code)
            return _json(answer.model_dump(mode="json"), status)

        handle.__name__ = view.__name__
        blueprint.add_url_rule(rule, view.__name__, handle, methods=[method])
        return view

    return register


def _json(payload: Any, status: int) -> Response:
    response = jsonify(payload)
    response.status_code = status
    return response


def context_for(app: Flask, session: Any, principal: Principal) -> Context:
    """A service call's context: the unit of work's session, who asks, the app's clock,
    keys and output directory (the API's endpoints and the web pages alike)."""
    return Context(
        session=session,
        principal=principal,
        now=app.config["CLOCK"](),
        keys=app.config["KEY_STORE"],
        output_dir=Path(app.config["PERSONALIZATION_DIR"]),
    )


def run_signed_webhook(
    app: Flask, webhook: SignedWebhook, raw_body: bytes, headers: dict[str, str]
) -> Any:
    """The webhook's answer, as JSON: its view run in one transaction (or statement)."""

    def work(session):  # type: ignore[no-untyped-def]
        ctx = context_for(app, session, Principal(0, "bank"))
        return webhook.view(ctx, raw_body=raw_body, headers=headers)

    return app.extensions["database"].run(work, webhook.one_statement).model_dump(mode="json")


class SignedWebhooksFirst:
    """A POST to a signed webhook's path (the bank's callback: one every top-up) answered
    in plain WSGI, ahead of Flask: its request context, URL matching and response objects
    cost about a third of a callback's CPU (in process on PostgreSQL, 1,500 callbacks a
    round: 1.1–1.2 against 0.75–0.8 ms). Installed as the app's ``wsgi_app``: the test
    client goes through it too. The answer is the one Flask gives — the same JSON, the
    same errors (``error_answer``) — and any other request is Flask's (``inner``)."""

    def __init__(self, app: Flask, inner: Callable) -> None:
        self.app, self.inner = app, inner

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        webhook = SIGNED_WEBHOOKS.get(environ.get("PATH_INFO", ""))
        if webhook is None or environ.get("REQUEST_METHOD") != "POST":
            return self.inner(environ, start_response)
        extra: dict[str, str] = {}
        with self.app.app_context():  # (the view reads the app's settings)
            try:
                raw_body = request_body(environ, request_body_bytes_max)
                headers = {
                    name[5:].replace("_", "-").lower(): value
                    for name, value in environ.items()
                    if name.startswith("HTTP_")
                }
                status = webhook.status
                payload = run_signed_webhook(self.app, webhook, raw_body, headers)
            except BodyRefused as refused:  # (as every endpoint refuses a body: 422)
                status, payload, extra = error_answer(InvalidInput(str(refused)))
            except Exception as error:
                status, payload, extra = error_answer(error)
            body = self._json(payload)
        return json_answer(start_response, status, body, extra)

    def _json(self, payload: Any) -> bytes:
        """As ``jsonify`` writes it (compact, unless the app is in debug mode)."""
        provider = self.app.json
        pretty = provider.compact is False or (provider.compact is None and self.app.debug)  # type: ignore[attr-defined]
        layout: dict[str, Any] = {"indent": 2} if pretty else {"separators": (",", ":")}
        return (provider.dumps(payload, **layout) + "\n").encode()


def _parse_body(model: type[BaseModel]) -> BaseModel:
    raw = request.get_data(cache=False)
    if len(raw) > request_body_bytes_max:
        raise InvalidInput(f"body larger than {request_body_bytes_max} bytes")
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as error:
        raise InvalidInput("the body does not match the schema", errors=_errors(error)) from None


def _parse_query(model: type[BaseModel]) -> BaseModel:
    try:
        return model.model_validate(request.args.to_dict(), by_alias=True)
    except ValidationError as error:
        raise InvalidInput("the query does not match the schema", errors=_errors(error)) from None


def _errors(error: ValidationError) -> list[dict[str, Any]]:
    # Location and message only: never echo the input (it may hold an id number or a key).
    return [
        {"loc": ".".join(str(part) for part in item["loc"]), "msg": item["msg"]}
        for item in error.errors(include_url=False, include_input=False)
    ]


database_retry_after_s = 1
# SQLSTATEs that asking again shortly may cure (PostgreSQL, appendix A): the connection
# (class 08), the server shutting down or restarting (57P01–57P03), a serialization failure
# or deadlock that outlived the retries, a statement timeout, too many connections, a lock
# not available, a transaction ended for idling (``db.SessionLimits``).
TRANSIENT_SQLSTATES = (
    "40001", "40P01", "57014", "57P01", "57P02", "57P03", "53300", "55P03", "25P03",
)  # fmt: skip


def database_busy_or_gone(error: DBAPIError) -> bool:
    """The database unreachable or too busy for now (a 503), not a request it can never
    run. A connection lost during COMMIT may have committed: the Idempotency-Key (and the
    bank's webhook-id) make asking again safe where money moves."""
    if error.connection_invalidated:
        return True
    state = getattr(error.orig, "sqlstate", None) or ""
    if state.startswith("08") or state in TRANSIENT_SQLSTATES:
        return True
    return "database is locked" in str(error.orig)  # (SQLite: a writer held it too long)


def error_answer(error: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, JSON body and extra headers an error is answered with: one shape for
    every endpoint, whichever way it was reached (Flask's handlers, ``SignedWebhooksFirst``)."""
    if isinstance(error, DomainError):
        return error.status, error.to_json(), {}
    if isinstance(error, IntegrityError):
        return 409, {"error": {"code": "conflict", "message": "conflicts with stored data"}}, {}
    # (Any driver error but IntegrityError, handled above: psycopg raises some of the
    # transient ones as others, an idle transaction ended as an InternalError.)
    if isinstance(error, DBAPIError) and database_busy_or_gone(error):
        log.warning("database unavailable: %s", error.orig)
        message = "the database is unavailable: try again (with the same Idempotency-Key)"
        retry = {"Retry-After": str(database_retry_after_s)}
        return 503, {"error": {"code": "unavailable", "message": message}}, retry
    if isinstance(error, HTTPException):
        code = (error.name or "error").lower().replace(" ", "_")
        return error.code or 500, {"error": {"code": code, "message": error.description or ""}}, {}
    # a bug, a limit (a driver error asking again will not help): logged, not told
    log.error("unexpected error", exc_info=error)
    return 500, {"error": {"code": "internal", "message": "internal error"}}, {}


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(Exception)  # (HTTPException too: Flask hands those to it as well)
    def answer_error(error: Exception) -> Response:
        status, payload, headers = error_answer(error)
        response = _json(payload, status)
        response.headers.update(headers)
        return response


path_integer_max = 2**62  # ids live in 64-bit signed columns

# Path parameters whose values have a shape (everything else is a plain string).
PATH_PARAMETER_SCHEMAS: dict[str, dict[str, Any]] = {
    "day": {"type": "string", "format": "date"},
}


def _path_schema(rule: str, name: str) -> dict[str, Any]:
    if f"<int:{name}>" in rule:
        return {"type": "integer", "minimum": 0, "maximum": path_integer_max}
    return PATH_PARAMETER_SCHEMAS.get(name, {"type": "string"})


def openapi_document(title: str, version: str) -> dict[str, Any]:
    components: dict[str, Any] = {}

    def schema_of(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            components[name] = definition
        components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_ref = schema_of(ErrorResponse)
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", op.rule)
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": _path_schema(op.rule, name)}
            for name in re.findall(r"\{(\w+)\}", path)
        ]
        if op.query:
            query_schema = op.query.model_json_schema(by_alias=True)
            for name, prop in query_schema.get("properties", {}).items():
                required = name in query_schema.get("required", [])
                parameters.append(
                    {"name": name, "in": "query", "required": required, "schema": prop}
                )
        if op.idempotent:
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": 100},
                }
            )
        if op.media_type == "application/json":
            success_schema = schema_of(op.response) if op.response else {"type": "object"}
        else:
            success_schema = {"type": "string"}
        responses: dict[str, Any] = {
            str(op.status): {
                "description": "OK",
                "content": {op.media_type: {"schema": success_schema}},
            }
        }
        for code in ("401", "403", "404", "409", "422"):
            responses[code] = {
                "description": "error",
                "content": {"application/json": {"schema": error_ref}},
            }
        operation: dict[str, Any] = {
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": parameters,
            "responses": responses,
            "security": [] if op.signed_webhook else [{"bearer": []}],
            "description": f"Roles: {', '.join(op.roles)}.",
        }
        if op.signed_webhook:
            for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
                parameters.append(
                    {"name": header, "in": "header", "required": True, "schema": {"type": "string"}}
                )
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        if op.body:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of(op.body)}},
            }
        paths.setdefault(path, {})[op.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def utc_now() -> datetime:
    return datetime.now().replace(microsecond=0)
