"""The SIM's OTA security domain (ota.md §3), sans I/O: a command packet in (the SMS-PP
ENVELOPE's TPDU user data), a PoR out; the APDUs run through a callback.

Rules, in order: a TAR the SIM does not host → PoR 09; less than the transit TAR's
minimum security (ciphered, CC, counter "must be higher") → PoR 0A, nothing runs; a bad CC
→ 01; a replayed or older counter → 02, nothing runs. The accepted counter is written
before the commands run, so a torn execution cannot be replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from otar.keys import (
    KEY_TYPE_AES,
    PUT_KEY_CLA,
    PUT_KEY_INS,
    PUT_KEY_P2_MULTIPLE,
    PutKeyInvalid,
    expected_put_key_response,
    open_put_key,
)
from otar.packets import (
    CounterMode,
    Integrity,
    OtaError,
    OtaKeyset,
    PorRequest,
    PorStatus,
    Spi,
    decode_command,
    encode_por,
    peek_header,
)
from otar.remote_apdu import CompactResponse, decode_script

TRANSIT_TAR = bytes.fromhex("425553")  # project-defined, ota.md §3
ISD_TAR = bytes.fromhex("000000")  # the issuer security domain (TS 101 220 §6.4): PUT KEY
_PLAIN_POR = Spi(Integrity.NONE, False, CounterMode.NONE, PorRequest.ALWAYS, Integrity.NONE, False)

RunApdus = Callable[[bytes, list[bytes]], list[bytes]]


@dataclass
class OtaSecurityDomain:
    keysets: dict[int, OtaKeyset]  # by KIc key index = key version
    last_counters: dict[int, int] = field(default_factory=dict)  # persisted with the SIM
    tars: frozenset[bytes] = frozenset({TRANSIT_TAR, ISD_TAR})
    keks: dict[int, bytes] = field(default_factory=dict, repr=False)  # by key version

    def process(self, packet: bytes, run: RunApdus) -> bytes:
        """The PoR (SMS user data with its UDH), or b"" when the SPI asks for none."""
        try:
            spi, kic, _, tar = peek_header(packet)
        except (OtaError, IndexError):
            return b""  # not even a header to answer to
        keyset = self.keysets.get(kic >> 4)
        if keyset is None:
            return encode_por(
                _any_keyset(self), _PLAIN_POR, tar, 0, PorStatus.UNDEFINED_SECURITY_ERROR, b""
            )
        try:
            command = self._accept(keyset, spi, tar, packet)
        except OtaError as error:
            return self._por(keyset, spi, tar, 0, error.status, b"", error=True)
        if tar == ISD_TAR:
            response = self._execute(
                lambda _, apdus: [self._isd_command(keyset, a) for a in apdus], tar, command.data
            )
        else:
            response = self._execute(run, tar, command.data)
        failed = response.last_sw not in (0x9000,) and response.last_sw >> 8 != 0x61
        return self._por(
            keyset, spi, tar, command.counter, PorStatus.OK, response.encode(), error=failed
        )

    def _accept(self, keyset: OtaKeyset, spi: Spi, tar: bytes, packet: bytes):  # type: ignore[no-untyped-def]
        if tar not in self.tars:
            raise OtaError(PorStatus.TAR_UNKNOWN, "TAR not hosted")
        if not (
            spi.ciphered
            and spi.integrity is Integrity.CC
            and spi.counter >= CounterMode.MUST_BE_HIGHER
        ):
            raise OtaError(PorStatus.INSUFFICIENT_SECURITY_LEVEL, "below the TAR's minimum")
        command = decode_command(keyset, packet)
        last = self.last_counters.get(keyset.kic_idx, -1)
        if command.counter <= last:
            raise OtaError(PorStatus.COUNTER_LOW, "replayed or older counter")
        if spi.counter is CounterMode.MUST_BE_ONE_HIGHER and command.counter != last + 1:
            raise OtaError(PorStatus.COUNTER_HIGH, "counter must be one higher")
        self.last_counters[keyset.kic_idx] = command.counter
        return command

    @staticmethod
    def _execute(run: RunApdus, tar: bytes, script: bytes) -> CompactResponse:
        try:
            apdus = decode_script(script)
        except ValueError:
            return CompactResponse(0, 0x6700, b"")
        answers = run(tar, apdus)
        for executed, answer in enumerate(answers, start=1):
            sw = int.from_bytes(answer[-2:], "big") if len(answer) >= 2 else 0x6F00
            if executed == len(answers) or (sw != 0x9000 and sw >> 8 != 0x61):
                return CompactResponse(executed, sw, answer[:-2])
        return CompactResponse(0, 0x6F00, b"")

    # --- the issuer security domain: key management ------------------------------------

    def _isd_command(self, keyset: OtaKeyset, apdu: bytes) -> bytes:
        header = apdu[:4]
        if header[:2] == bytes((PUT_KEY_CLA, PUT_KEY_INS)):
            return self._put_key(keyset, apdu)
        if header == bytes.fromhex("80CA00E0"):
            return self._key_information() + b"\x90\x00"
        return b"\x6d\x00"

    def _put_key(self, keyset: OtaKeyset, apdu: bytes) -> bytes:
        """Replace the keyset that carried this packet (P1 = its version) by a new one:
        from here on, packets under the old version are refused."""
        old = keyset.kic_idx
        if len(apdu) < 5 or apdu[2] != old or apdu[3] != PUT_KEY_P2_MULTIPLE:
            return b"\x6a\x86"
        if old not in self.keks:
            return b"\x69\x85"  # personalized without a KEK: no rekeying
        try:
            new = open_put_key(self.keks[old], apdu[5 : 5 + apdu[4]])
        except PutKeyInvalid:
            return b"\x6a\x80"
        if new.version == old or new.version in self.keysets:
            return b"\x6a\x80"
        self.keysets[new.version] = OtaKeyset(
            keyset.algo_crypt, new.version, new.kic, keyset.algo_auth, new.version, new.kid
        )
        self.keks[new.version] = new.kek
        # The counter carries over: a packet seen under the old keys stays old.
        self.last_counters[new.version] = self.last_counters.get(old, -1)
        for table in (self.keysets, self.keks, self.last_counters):
            table.pop(old, None)  # type: ignore[attr-defined]
        return expected_put_key_response(new) + b"\x90\x00"

    def _key_information(self) -> bytes:
        """GET DATA E0 (GlobalPlatform key information template): id, version, type, length
        of KIc (1), KID (2) and KEK (3) per version."""
        entries = b"".join(
            bytes((0xC0, 0x04, key_id, version, KEY_TYPE_AES, 0x10))
            for version in sorted(self.keysets)
            for key_id in (1, 2, 3)
        )
        return bytes((0xE0, len(entries))) + entries

    @staticmethod
    def _por(
        keyset: OtaKeyset,
        spi: Spi,
        tar: bytes,
        counter: int,
        status: PorStatus,
        data: bytes,
        *,
        error: bool,
    ) -> bytes:
        if spi.por is PorRequest.NEVER or (spi.por is PorRequest.ON_ERROR and not error):
            return b""
        if status is not PorStatus.OK:
            spi = _PLAIN_POR  # a refused packet's keys cannot be trusted to secure the answer
        return encode_por(keyset, spi, tar, counter, status, data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keysets": {
                str(index): {
                    "algo_crypt": k.algo_crypt,
                    "kic_idx": k.kic_idx,
                    "kic": k.kic.hex(),
                    "algo_auth": k.algo_auth,
                    "kid_idx": k.kid_idx,
                    "kid": k.kid.hex(),
                }
                for index, k in self.keysets.items()
            },
            "last_counters": {str(index): c for index, c in self.last_counters.items()},
            "keks": {str(version): kek.hex() for version, kek in self.keks.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OtaSecurityDomain:
        keysets = {
            int(i): OtaKeyset(
                k["algo_crypt"],
                k["kic_idx"],
                bytes.fromhex(k["kic"]),
                k["algo_auth"],
                k["kid_idx"],
                bytes.fromhex(k["kid"]),
            )
            for i, k in data["keysets"].items()
        }
        counters = {int(i): int(c) for i, c in data["last_counters"].items()}
        keks = {int(v): bytes.fromhex(k) for v, k in data.get("keks", {}).items()}
        return cls(keysets, counters, keks=keks)


def _any_keyset(domain: OtaSecurityDomain) -> OtaKeyset:
    return next(iter(domain.keysets.values()))
