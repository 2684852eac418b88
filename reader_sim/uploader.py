"""The POS's uploader: records go up in batches and stay in the store until the platform
acknowledges them (accepted or duplicate — both mean stored). Network trouble is retried
with exponential backoff; the caller owns the loop and its clock."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from reader_sim.platform_client import PlatformClient, PlatformUnavailable
from reader_sim.records import RecordStore

log = logging.getLogger(__name__)
batch_records_default = 500
backoff_first_ms = 500
backoff_max_ms = 60_000
attempts_max = 8


@dataclass
class UploadReport:
    uploaded: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    failures: int = 0


class Uploader:
    def __init__(
        self,
        store: RecordStore,
        platform: PlatformClient,
        terminal_id: bytes,
        *,
        batch_records: int = batch_records_default,
        sleep: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.store = store
        self.platform = platform
        self.terminal_id = terminal_id
        self.batch_records = batch_records
        self.sleep = sleep

    def upload_all(self) -> UploadReport:
        """Upload until nothing is left or the platform stays unreachable for
        ``attempts_max`` tries (then the records simply wait for the next run)."""
        report = UploadReport()
        delay_ms = backoff_first_ms
        while True:
            batch = self.store.records(only_unacknowledged=True, limit=self.batch_records)
            if not batch:
                return report
            try:
                answer = self.platform.call(
                    "POST",
                    "/api/v1/pos/records",
                    {"records": [record.to_json() for record in batch]},
                )
            except PlatformUnavailable as error:
                report.failures += 1
                if report.failures >= attempts_max:
                    log.warning("platform unreachable, %d records wait: %s", len(batch), error)
                    return report
                self.sleep(delay_ms / 1000)
                delay_ms = min(delay_ms * 2, backoff_max_ms)
                continue
            delay_ms = backoff_first_ms
            stored = answer["accepted"] + answer["duplicate"]
            # A rejected record is flagged on the platform (a conflict); keeping it here
            # would block the store forever, so it is acknowledged and logged.
            rejected = [item["terminal_seq"] for item in answer["rejected"]]
            for item in answer["rejected"]:
                log.error("record %s rejected: %s", item["terminal_seq"], item["reason"])
            self.store.acknowledge(self.terminal_id, stored + rejected)
            report.batches += 1
            report.uploaded += len(answer["accepted"])
            report.duplicates += len(answer["duplicate"])
            report.rejected += len(rejected)
