"""Banks that fail as a test tells them, in front of the simulated bank (or none)."""

from __future__ import annotations

import requests


class RefusingBank:
    """Every refund raises ``error``: the bank's no (``topups.RefundRefused``), busy
    (``topups.BankBusy``), or not reached (a ``requests`` error). ``asked`` counts."""

    def __init__(self, error: Exception) -> None:
        self.error, self.asked = error, 0

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str:
        self.asked += 1
        raise self.error


class FlakyRefunds:
    """The simulated bank, failing the next refunds as told (``failures``): True — done
    at the bank, the answer lost; False — not reached. Then it answers again."""

    def __init__(self, bank, failures: list[bool] | None = None) -> None:  # type: ignore[no-untyped-def]
        self.bank, self.failures = bank, list(failures or [])

    def refund(self, payment_id: str, amount_fen: int, reason: str, refund_key: str) -> str:
        if not self.failures:
            return self.bank.refund(payment_id, amount_fen, reason, refund_key)
        if self.failures.pop(0):
            self.bank.refund(payment_id, amount_fen, reason, refund_key)
            raise requests.ReadTimeout("the bank's answer was lost")
        raise requests.ConnectionError("the bank could not be reached")
