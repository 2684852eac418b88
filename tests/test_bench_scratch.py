"""The benchmarks' and the tests' free ports: never the same one twice in a run, never one
of vpcd's (a server there would keep pcscd's virtual reader from listening)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench import scratch


def test_a_port_the_system_gives_again_is_not_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = iter([50_001, 50_001, 35_963, 50_002])  # (a port just closed given again; vpcd's)

    class Probe:
        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *_) -> None:  # type: ignore[no-untyped-def]
            pass

        def bind(self, _address) -> None:  # type: ignore[no-untyped-def]
            self.port = next(given)

        def getsockname(self):  # type: ignore[no-untyped-def]
            return ("127.0.0.1", self.port)

    # (scratch's own name for the module, not socket.socket: other threads make sockets)
    monkeypatch.setattr(scratch, "socket", SimpleNamespace(socket=Probe))
    monkeypatch.setattr(scratch, "_ports_handed_out", set())
    assert [scratch.free_port(), scratch.free_port()] == [50_001, 50_002]  # (35963: vpcd's)
