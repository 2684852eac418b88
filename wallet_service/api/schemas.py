"""Request and response bodies (pydantic): they validate at the edge and make the OpenAPI
document. Hex fields are upper- or lower-case hex of the stated length."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from wallet_service.services.reconciliation import (
    AT_TO_THE_SECOND,
    PAYMENT_AMOUNT,
    REFUND_AMOUNT,
    STATEMENT_COLUMNS,
)

COUNT_MAX = 2**62  # versions, ids, counters: well inside a 64-bit signed column

Code = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,16}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Fen = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
PositiveFen = Annotated[int, Field(ge=1, le=0xFFFFFFFF)]
Serial = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{20}$")]
TerminalId = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{12}$")]
Hex4 = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{8}$")]
Iccid = Annotated[str, StringConstraints(pattern=r"^[0-9]{19,20}$")]
Phone = Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{5,15}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OperatorIn(Strict):
    code: Code
    name: Name
    fee_rate_bp: int = Field(default=0, ge=0, le=10_000)


class OperatorOut(BaseModel):
    code: str
    name: str
    fee_rate_bp: int


class HallIn(Strict):
    code: Code
    name: Name
    kind: Literal["hall", "agent"]
    daily_limit_fen: Fen


class HallOut(BaseModel):
    code: str
    name: str
    kind: str
    daily_limit_fen: int


class FleetIn(Strict):
    code: Code
    name: Name


class RouteIn(Strict):
    code: Code
    name: Name
    fare_fen: Fen


class VehicleIn(Strict):
    code: Code
    plate: Annotated[str, StringConstraints(min_length=1, max_length=16)]
    fleet: Code
    route: Code | None = None


class DriverIn(Strict):
    code: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,10}$")]
    name: Annotated[str, StringConstraints(min_length=1, max_length=8)]
    fleet: Code


class DriverCardIn(Strict):
    serial: Serial
    expiry: date


class DriverCardOut(BaseModel):
    serial: str
    driver: str
    expiry: date
    image_file: str


class PosDeviceIn(Strict):
    terminal_id: TerminalId
    vehicle: Code


class PosDeviceOut(BaseModel):
    terminal_id: str
    vehicle: str
    token: str = Field(description="the device's API token, shown once")
    psam_file: str = Field(description="PSAM personalization file, in the output directory")


class RegistryItem(BaseModel):
    code: str
    name: str | None = None
    fare_fen: int | None = None
    fleet_id: int | None = None
    route_id: int | None = None
    plate: str | None = None


class RegistryList(BaseModel):
    items: list[RegistryItem]


class CardIssueIn(Strict):
    iccid: Iccid
    phone: Phone
    algorithm: Literal["3des", "sm4"] = "3des"


class CardOut(BaseModel):
    serial: str
    iccid: str
    phone: str
    status: str
    algorithm: str
    holder_name: str | None
    holder_id_masked: str | None
    balance_fen: int
    image_file: str


class HolderIn(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=40)]
    id_type: Literal["resident_id", "passport", "other"]
    id_number: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z]{6,32}$")]


class IdentityIn(Strict):
    id_number: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z]{6,32}$")]


class ReissueIn(IdentityIn):
    iccid: Iccid
    phone: Phone


class CloseOut(BaseModel):
    card: CardOut
    refund_fen: int


class LoadAuthorizeIn(Strict):
    card_serial: Serial
    amount_fen: PositiveFen
    terminal_id: TerminalId
    init_response: Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]{32}$")] = Field(
        description="the card's INITIALIZE FOR LOAD response data (16 bytes), without SW"
    )


class LoadAuthorizeOut(BaseModel):
    load_id: int
    mac2: str
    date: str
    time: str


class LoadConfirmIn(Strict):
    tac: Hex4


class LoadResolveIn(Strict):
    proof_tac: Hex4 | None = Field(
        description="the TAC from GET TRANSACTION PROVE, or null when the card answered 69 85"
    )


class LoadOut(BaseModel):
    load_id: int
    state: str
    amount_fen: int
    card_serial: str
    tac: str | None


class TapRecordIn(Strict):
    terminal_id: TerminalId
    terminal_seq: int = Field(ge=0, le=0xFFFFFFFF)
    card_serial: Serial
    ctc: int = Field(ge=0, le=0xFFFF)
    amount: Fen
    balance_before: Fen
    balance_after: Fen
    transaction_type: Literal[6, 9]
    occurred_at: datetime
    tac: Hex4
    mac2: Hex4
    mac2_verified: bool
    key_version: int = Field(ge=0, le=255)
    algorithm: Literal[0, 4]
    operator: Code
    route: Annotated[str, StringConstraints(max_length=16)]
    vehicle: Annotated[str, StringConstraints(max_length=16)]
    driver: Annotated[str, StringConstraints(max_length=10)]
    recovered: bool


class UploadIn(Strict):
    records: list[TapRecordIn] = Field(max_length=1000)


class Rejected(BaseModel):
    terminal_seq: int
    reason: str


class UploadOut(BaseModel):
    accepted: list[int]
    duplicate: list[int]
    rejected: list[Rejected]


class BlacklistQuery(Strict):
    since: int = Field(default=0, ge=0, le=COUNT_MAX)


class BlacklistOut(BaseModel):
    version: int
    full: bool
    add: list[str]
    remove: list[str]


class HeartbeatIn(Strict):
    firmware: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    blacklist_version: int = Field(ge=0, le=COUNT_MAX)
    records_pending: int = Field(ge=0, le=COUNT_MAX)
    last_upload_at: datetime | None = None
    psam_seq: int = Field(ge=0, le=0xFFFFFFFF)


class DeviceStatus(BaseModel):
    terminal_id: str
    online: bool
    silent: bool = Field(default=False, description="no heartbeat for silent_hours")
    last_heartbeat_at: datetime | None
    firmware: str | None
    records_pending: int | None
    last_upload_at: datetime | None
    psam_seq: int | None
    blacklist_version: int | None
    blacklist_lag: int | None
    retired_at: datetime | None = Field(default=None, description="out of service since")


class RetirePosIn(Strict):
    """Why a POS leaves service for good (kept in the audit trail)."""

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class RetiredPosOut(BaseModel):
    terminal_id: str
    retired_at: datetime
    tokens_revoked: int
    records_pending: int | None = Field(
        description="records its last heartbeat said it had not uploaded: they never will be"
    )


class DeviceStatusList(BaseModel):
    devices: list[DeviceStatus]


class LedgerAccount(BaseModel):
    code: str
    kind: str
    debits_fen: int
    credits_fen: int


class LedgerOut(BaseModel):
    balanced: bool
    accounts: list[LedgerAccount]


class ClearingRunIn(Strict):
    date: date


class ClearingRunOut(BaseModel):
    run_id: int
    business_date: date
    records: int
    paid_records: int
    paid_fen: int
    exceptions: dict[str, int]
    hot_listed: list[str]


class ClearingTotalOut(BaseModel):
    operator: str
    fleet: str
    route: str
    vehicle: str
    driver: str
    adjustment: bool
    records: int
    amount_fen: int


class ClearingExceptionOut(BaseModel):
    kind: str
    card_serial: str
    terminal_id: str | None
    record_id: int | None
    details: dict


class ClearingRunSummary(BaseModel):
    run_id: int
    records: int
    paid_records: int
    paid_fen: int


class ClearingDayOut(BaseModel):
    business_date: date
    runs: list[ClearingRunSummary]
    paid_records: int
    paid_fen: int
    totals: list[ClearingTotalOut]
    exception_counts: dict[str, int]
    exceptions: list[ClearingExceptionOut]


class StatementOut(BaseModel):
    run_id: int
    records: int
    gross_fen: int
    adjustments_fen: int
    fee_rate_bp: int
    fee_fen: int
    net_fen: int


class StatementsOut(BaseModel):
    operator: str
    business_date: date
    statements: list[StatementOut]


class RecordQuery(Strict):
    card: Serial | None = None
    start: date | None = Field(default=None, alias="from")
    end: date | None = Field(default=None, alias="to")
    route: Annotated[str, StringConstraints(max_length=16)] | None = None
    vehicle: Annotated[str, StringConstraints(max_length=16)] | None = None
    driver: Annotated[str, StringConstraints(max_length=10)] | None = None
    device: TerminalId | None = None


class StatsQuery(RecordQuery):
    by: Literal["hour", "day", "route", "vehicle", "driver"] = "route"


class PageQuery(RecordQuery):
    after_id: int = Field(default=0, ge=0, le=COUNT_MAX)
    limit: int = Field(default=100, ge=1, le=1000)


class StatRow(BaseModel):
    key: str
    rides: int
    revenue_fen: int


class StatsOut(BaseModel):
    by: str
    rows: list[StatRow]


class RecordOut(BaseModel):
    id: int
    terminal_id: str
    terminal_seq: int
    card_serial: str
    ctc: int
    amount_fen: int
    balance_before_fen: int
    balance_after_fen: int
    transaction_type: int
    occurred_at: datetime
    tac: str
    route: str
    vehicle: str
    driver: str
    recovered: bool
    excluded: bool
    clearing_run_id: int | None


class RecordPage(BaseModel):
    records: list[RecordOut]
    next_after_id: int | None


class DeviceStatusQuery(Strict):
    silent_hours: int = Field(default=24, ge=1, le=24 * 90)


class WebhookAck(BaseModel):
    webhook_id: str
    duplicate: bool


# The bank's daily statement CSV, exactly (reader_sim.bank.Bank.statement); sized to fit a
# request body, and so far below the service's statement line limit.
_IDS = r"[^,\r\n]+,[^,\r\n]*,[^,\r\n]+"  # id, payment_id (may be empty), order_id
STATEMENT_PATTERN = (
    rf"^{','.join(STATEMENT_COLUMNS)}\r?\n"
    rf"((payment,{_IDS},{PAYMENT_AMOUNT}|refund,{_IDS},{REFUND_AMOUNT})"
    rf",{AT_TO_THE_SECOND}\r?\n)*$"
)


class ReconcileIn(Strict):
    statement_csv: Annotated[
        str, StringConstraints(max_length=1_900_000, pattern=STATEMENT_PATTERN)
    ]


class ReconcileFinding(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: str
    order: str


class ReconcileOut(BaseModel):
    day: date
    bank_paid_fen: int
    bank_refunded_fen: int
    loaded_fen: int
    orders: int
    matched: bool
    findings: list[ReconcileFinding]
    notes: list[ReconcileFinding] = []  # what matched but a person should know


class TopUpOut(BaseModel):
    """An over-the-air top-up order as the platform sees it (no keys, no MACs)."""

    reference: str
    card_serial: str
    amount_fen: int
    state: str
    created_at: datetime
    finished_at: datetime | None
    failure: str | None
    tac: str | None


class TopUpList(BaseModel):
    orders: list[TopUpOut]


class SettleUnprovenIn(Strict):
    """Why an operator gives up proving a lost card's load (kept in the audit trail)."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class RekeyOut(BaseModel):
    """Moving a SIM to its next OTA key version (no keys here)."""

    card_serial: str
    from_version: int
    to_version: int
    state: str
    attempts: int
    created_at: datetime
    finished_at: datetime | None
