"""The POS's GPRS session with the platform: upload records, download the blacklist delta,
send a heartbeat. Each part is independent: a failure of one leaves the others' state
intact and is retried at the next sync."""

from __future__ import annotations

from dataclasses import dataclass, field

from reader_sim.platform_client import PlatformClient, PlatformRefused, PlatformUnavailable
from reader_sim.pos import BusPos
from reader_sim.uploader import Uploader, UploadReport

FIRMWARE = "reader_sim/0.1"


@dataclass
class SyncReport:
    upload: UploadReport = field(default_factory=UploadReport)
    blacklist_version: int = 0
    errors: list[str] = field(default_factory=list)


class GprsSync:
    def __init__(self, pos: BusPos, platform: PlatformClient, uploader: Uploader | None = None):
        self.pos = pos
        self.platform = platform
        self.uploader = uploader or Uploader(pos.store, platform, pos.terminal_id)
        self.last_upload_ok_at: str | None = None

    def sync(self) -> SyncReport:
        report = SyncReport(upload=self.uploader.upload_all())
        if report.upload.failures == 0:
            self.last_upload_ok_at = self.pos.clock().replace(microsecond=0).isoformat()
        try:
            report.blacklist_version = self._download_blacklist()
        except (PlatformUnavailable, PlatformRefused) as error:
            report.errors.append(f"blacklist: {error}")
            report.blacklist_version = self.pos.store.blacklist()[0]
        try:
            self._heartbeat(report.blacklist_version)
        except (PlatformUnavailable, PlatformRefused) as error:
            report.errors.append(f"heartbeat: {error}")
        return report

    def _download_blacklist(self) -> int:
        version, _ = self.pos.store.blacklist()
        answer = self.platform.call("GET", f"/api/v1/pos/blacklist?since={version}")
        added = [bytes.fromhex(serial) for serial in answer["add"]]
        removed = [bytes.fromhex(serial) for serial in answer["remove"]]
        self.pos.store.apply_blacklist(
            answer["version"], full=answer["full"], added=added, removed=removed
        )
        self.pos.downloaded_blacklist = self.pos.store.blacklist()[1]
        return answer["version"]

    def _heartbeat(self, blacklist_version: int) -> None:
        pending = len(self.pos.store.records(only_unacknowledged=True, limit=1_000_000))
        self.platform.call(
            "POST",
            "/api/v1/pos/heartbeat",
            {
                "firmware": FIRMWARE,
                "blacklist_version": blacklist_version,
                "records_pending": pending,
                "last_upload_at": self.last_upload_ok_at,
                "psam_seq": self.pos.psam.terminal_seq,
            },
        )
