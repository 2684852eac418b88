"""Start and stop pcscd (with the vpcd driver) for tests, benchmarks and ``card serve``.

Facts from pcsc-stack.md: one pcscd per machine (fixed socket /run/pcscd/pcscd.comm), so an
already running one is reused and left running; readiness is vpcd's port in LISTEN state in
/proc/net/tcp — never probed by connecting, since a connection *is* a card insertion.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from reader_sim.vpcd import VPCD_PORT_BASE

PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
ready_timeout_s = 15.0
stop_timeout_s = 10.0
_TCP_LISTEN = "0A"


class PcscUnavailable(Exception):
    """pcscd or the vpcd driver is not installed."""


def _socket_states(port: int) -> list[str]:
    """The kernel's TCP state codes of the sockets on local ``port`` (/proc/net/tcp)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for fields in (line.split() for line in lines):
            if fields[1].endswith(f":{port:04X}"):
                states.append(fields[3])
    return states


def vpcd_listening(slot: int = 0) -> bool:
    return _TCP_LISTEN in _socket_states(VPCD_PORT_BASE + slot)


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def vpcd_port_users(slot: int = 0) -> str:
    """What holds vpcd's port besides vpcd (for a refusal's message): sockets by state."""
    states = [_TCP_STATES.get(code, code) for code in _socket_states(VPCD_PORT_BASE + slot)]
    held = ", ".join(f"{state} x{states.count(state)}" for state in sorted(set(states)))
    return f"sockets on port {VPCD_PORT_BASE + slot}: {held or 'none'}"


def pcscd_running() -> bool:
    return subprocess.run(["pgrep", "-x", "pcscd"], capture_output=True).returncode == 0


class PcscDaemon:
    """``with PcscDaemon():`` — pcscd up with vpcd listening; stopped after, if we started it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PcscDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """pcscd running with vpcd listening: started here unless one runs already. Safe to
        call again; a pcscd that has gone since (another program's, stopped) is started anew."""
        executable = shutil.which("pcscd") or "/usr/sbin/pcscd"
        if not Path(executable).exists():
            raise PcscUnavailable("pcscd is not installed (apt-get install pcscd)")
        if not Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists():
            raise PcscUnavailable("the vpcd driver is not installed (vsmartcard-vpcd)")
        if not pcscd_running():
            self.process = subprocess.Popen(
                [executable, "--foreground"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + ready_timeout_s
        while not (vpcd_listening() and PCSCD_SOCKET.exists()):
            if self.process is not None and self.process.poll() is not None:
                raise PcscUnavailable(
                    f"pcscd exited with {self.process.returncode} ({vpcd_port_users()})"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PcscUnavailable(f"vpcd did not start listening ({vpcd_port_users()})")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
