"""``make run`` for now: a card's day, in memory, on the documented demo keys.

A card is issued, loaded at the counter's load terminal, and tapped on a bus POS: with no
driver signed in, after the driver's sign-in, again within the repeat window, pulled away
mid-payment and tapped again (recovered, charged once). Then its log, read from the card
with READ RECORD as the phone menu reads it, and the POS's records.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path

from reader_sim.link import InMemoryLink, exchange
from reader_sim.load_terminal import Loaded, LoadTerminal
from reader_sim.pos import BusPos, PosConfig
from reader_sim.pos_file import demo_psam_keys
from reader_sim.psam import Psam
from reader_sim.records import RecordStore
from sim_applet.driver_card import DriverData
from sim_applet.personalize import DEMO_ISSUER_KEYS, personalize, personalize_driver_card
from sim_applet.structures import (
    SFI_LOG,
    TRANSIT_AID,
    LogRecord,
    read_record,
    select_by_aid,
)


class _Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def run_demo(say: Callable[[str], None] = print) -> None:
    clock = _Clock(datetime.now().replace(hour=7, minute=30, second=0, microsecond=0))
    with tempfile.TemporaryDirectory(prefix="bus-card-demo-") as workdir:
        image = Path(workdir) / "phone.sim.json"
        sim = personalize(bytes.fromhex("20260000000000001001"))
        sim.save(image)
        phone = InMemoryLink(sim)
        say(f"1. Card issued: serial 20260000000000001001, image {image.name}")

        counter = LoadTerminal(DEMO_ISSUER_KEYS, bytes.fromhex("0000000000A1"), clock)
        loaded = counter.load(phone, 50_00)
        assert isinstance(loaded, Loaded), loaded
        say(
            f"2. Counter top-up 50.00 yuan: balance {loaded.balance_after / 100:.2f}, "
            f"TAC {loaded.tac.hex().upper()} verified"
        )

        store = RecordStore(Path(workdir) / "pos-records.sqlite")
        psam = Psam(demo_psam_keys(), bytes.fromhex("000012000001"))
        bus = BusPos(PosConfig("BUS-CO-1", "12", "V-1201", 2_00), psam, store, clock=clock)
        say("3. Bus POS on route 12, flat fare 2.00 yuan")
        say(f"   passenger taps: {bus.present(phone).message}")
        driver_card = personalize_driver_card(
            DriverData(
                bytes.fromhex("D0000000000000000007"),
                "D007",
                "BUS-CO-1",
                "F1",
                "Wang Wei",
                date(2036, 12, 31),
            )
        )
        say(f"   driver taps his card: {bus.present(InMemoryLink(driver_card)).message}")
        for _ in range(2):
            clock.advance(minutes=40)
            say(f"   passenger taps: {bus.present(phone).message}")
        clock.advance(seconds=3)
        say(f"   taps again 3 s later: {bus.present(phone).message}")

        clock.advance(minutes=50)
        # The phone leaves the field inside DEBIT FOR PURCHASE, after the card committed.
        sim.cut_power_after(7, during_ins=0x54)
        say(f"4. Phone pulled away mid-payment: {bus.present(phone).message}")
        phone.present_card()
        say(f"   tapped again: {bus.present(phone).message}")

        say("5. The card's log (READ RECORD, SFI 0x18, newest first):")
        exchange(phone, select_by_aid(TRANSIT_AID))
        for number in range(1, 11):
            data, sw = exchange(phone, read_record(SFI_LOG, number, 23))
            if sw != 0x9000:
                break
            entry = LogRecord.decode(data)
            say(
                f"   CTC {entry.ctc}  type {entry.transaction_type:02X}  "
                f"{entry.amount / 100:6.2f} yuan  terminal {entry.terminal_id.hex().upper()}"
                f"  {entry.when}"
            )
        say("6. The POS's records, ready for upload:")
        for record in store.iter_records():
            say(
                f"   seq {record.terminal_seq}  card {record.card_serial.hex().upper()}"
                f"  CTC {record.ctc}  {record.amount / 100:.2f} yuan  balance "
                f"{record.balance_before / 100:.2f} -> {record.balance_after / 100:.2f}"
                f"  TAC {record.tac.hex().upper()}  driver {record.driver}"
                + ("  (recovered after tearing)" if record.recovered else "")
            )
        store.close()
        sim.save(image)
