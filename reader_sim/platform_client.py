"""The readers' way to the platform's API: JSON over HTTP with a bearer token.

``HttpTransport`` uses requests (a real POS or counter terminal); tests can hand in any
object with the same ``request`` method (e.g. one over Flask's test client). Network
failures become ``PlatformUnavailable`` (retry later); error answers ``PlatformRefused``.
"""

from __future__ import annotations

from typing import Any, Protocol

import requests

request_timeout_s = 10.0


class PlatformUnavailable(Exception):
    """No answer, or a 5xx: nothing is known to have happened; retry."""


class PlatformRefused(Exception):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.code = error.get("code")
        self.error = error


class Transport(Protocol):
    def request(
        self, method: str, path: str, json: Any, headers: dict[str, str]
    ) -> tuple[int, Any]: ...


class HttpTransport:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()

    def request(
        self, method: str, path: str, json: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                json=json,
                headers=headers,
                timeout=request_timeout_s,
            )
        except requests.RequestException as error:
            raise PlatformUnavailable(str(error)) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        return response.status_code, body

    def close(self) -> None:
        self.session.close()


class PlatformClient:
    def __init__(self, transport: Transport, token: str) -> None:
        self.transport = transport
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, idempotency_key: str | None = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        status, answer = self.transport.request(method, path, body, headers)
        if status >= 500:
            raise PlatformUnavailable(f"platform answered {status}")
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise PlatformRefused(status, error)
        return answer
