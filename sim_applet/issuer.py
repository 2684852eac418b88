"""The issuer's side of the e-purse cryptography (card-application.md §3): what a load
host computes and what clearing verifies. The card model computes the same values on its
side; tests check that the two paths agree ("check the same property on two paths").

Pure functions of master keys and transaction data; the platform later keeps the master
keys behind a key store and calls these.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from sim_applet import crypto
from sim_applet.crypto import Algorithm
from sim_applet.personalize import IssuerKeys
from sim_applet.structures import TYPE_LOAD, InitializeForLoadResponse


@dataclass(frozen=True)
class LoadAuthorization:
    """A verified INITIALIZE FOR LOAD: the session key stays with the host."""

    serial: bytes
    amount: int
    terminal_id: bytes
    card: InitializeForLoadResponse
    session_key: bytes

    def mac2(self, date_bcd: bytes, time_bcd: bytes) -> bytes:
        data = self._signed_head() + date_bcd + time_bcd
        return crypto.cbc_mac(self.card.algorithm, self.session_key, data)

    def _signed_head(self) -> bytes:
        return self.amount.to_bytes(4, "big") + bytes((TYPE_LOAD,)) + self.terminal_id

    def expected_tac(self, issuer: IssuerKeys, date_bcd: bytes, time_bcd: bytes) -> bytes:
        algorithm = self.card.algorithm
        dtk = crypto.diversify(algorithm, issuer.tac, self.serial)
        new_balance = self.card.old_balance + self.amount
        data = (
            new_balance.to_bytes(4, "big")
            + self.card.online_ctc.to_bytes(2, "big")
            + self._signed_head()
            + date_bcd
            + time_bcd
        )
        return crypto.cbc_mac(algorithm, crypto.tac_key(algorithm, dtk), data)


class Mac1Invalid(Exception):
    """The card's MAC1 does not verify: a wrong or cloned card. The load must stop."""


def authorize_load(
    issuer: IssuerKeys,
    serial: bytes,
    amount: int,
    terminal_id: bytes,
    card: InitializeForLoadResponse,
) -> LoadAuthorization:
    """Verify the card's MAC1 over (old balance ‖ amount ‖ 02 ‖ terminal id)."""
    dlk = crypto.diversify(card.algorithm, issuer.load, serial)
    session_key = crypto.load_session_key(card.algorithm, dlk, card.random, card.online_ctc)
    signed = (
        card.old_balance.to_bytes(4, "big")
        + amount.to_bytes(4, "big")
        + bytes((TYPE_LOAD,))
        + terminal_id
    )
    if not hmac.compare_digest(crypto.cbc_mac(card.algorithm, session_key, signed), card.mac1):
        raise Mac1Invalid(f"MAC1 of card {serial.hex()} does not verify")
    return LoadAuthorization(serial, amount, terminal_id, card, session_key)


def purchase_tac(
    issuer: IssuerKeys,
    algorithm: Algorithm,
    serial: bytes,
    *,
    amount: int,
    transaction_type: int,
    terminal_id: bytes,
    terminal_seq: int,
    date_bcd: bytes,
    time_bcd: bytes,
) -> bytes:
    """TAC over (amount ‖ type ‖ terminal id ‖ terminal seq ‖ date ‖ time): what clearing
    recomputes to accept a tap record."""
    return TacVerifier(issuer, algorithm, serial).tac(
        amount=amount,
        transaction_type=transaction_type,
        terminal_id=terminal_id,
        terminal_seq=terminal_seq,
        date_bcd=date_bcd,
        time_bcd=time_bcd,
    )


class TacVerifier:
    """Recomputes purchase TACs of one card (one key, one ECB context): clearing's hot path."""

    def __init__(self, issuer: IssuerKeys, algorithm: Algorithm, serial: bytes) -> None:
        dtk = crypto.diversify(algorithm, issuer.tac, serial)
        self._mac = crypto.MacKey(algorithm, crypto.tac_key(algorithm, dtk))

    def tac(
        self,
        *,
        amount: int,
        transaction_type: int,
        terminal_id: bytes,
        terminal_seq: int,
        date_bcd: bytes,
        time_bcd: bytes,
    ) -> bytes:
        return self._mac.mac(
            amount.to_bytes(4, "big")
            + bytes((transaction_type,))
            + terminal_id
            + terminal_seq.to_bytes(4, "big")
            + date_bcd
            + time_bcd
        )
