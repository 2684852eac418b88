"""The testers' command line: ``python app.py card …`` and ``python app.py pos …``.

Exit codes: 0 done; 1 the card or the POS said no (a refused tap, a script mismatch);
2 bad input (arguments, files). Hex appears here, at the edge, and nowhere inside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

import click

from reader_sim.link import InMemoryLink
from reader_sim.load_terminal import Loaded, LoadTerminal
from reader_sim.pos import Outcome
from reader_sim.pos_file import PosFileError, open_pos
from reader_sim.script import ScriptError, parse_script, run_script
from sim_applet.crypto import Algorithm
from sim_applet.driver_card import DriverCard, DriverData
from sim_applet.image import ImageError
from sim_applet.personalize import (
    DEMO_DRIVER_MASTER_KEY,
    DEMO_ISSUER_KEYS,
    IssuerKeys,
    personalize,
    personalize_driver_card,
)
from sim_applet.purse import TransitPurse
from sim_applet.sim import Sim
from sim_applet.structures import LogRecord, PublicData


class BadInput(click.ClickException):
    exit_code = 2


def _load_sim(path: str) -> Sim:
    try:
        return Sim.load(path)
    except ImageError as error:
        raise BadInput(str(error)) from None


def _serial(value: str | None, default_seed: bytes) -> bytes:
    if value is None:
        return default_seed
    try:
        serial = bytes.fromhex(value)
    except ValueError:
        serial = b""
    if len(serial) != 10:
        raise BadInput(f"--serial must be 20 hex digits (10 bytes), got {value!r}")
    return serial


def _issuer_keys(path: str | None) -> IssuerKeys:
    if path is None:
        return DEMO_ISSUER_KEYS
    try:
        return IssuerKeys.from_file(path)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _refuse_overwrite(path: str, force: bool) -> None:
    if Path(path).exists() and not force:
        raise BadInput(f"{path} exists: a card image is never overwritten without --force")


@click.group()
def card() -> None:
    """Card images: create, inspect, drive with APDUs, insert into a PC/SC reader."""


@card.command("new")
@click.argument("image")
@click.option("--serial", help="application serial number, 20 hex digits")
@click.option("--algorithm", type=click.Choice(["3des", "sm4"]), default="3des", show_default=True)
@click.option("--balance", "balance_fen", type=click.IntRange(0), default=0, help="fen")
@click.option("--keys", "keys_path", help="issuer master keys (JSON); default: demo keys")
@click.option("--pin", default="123456", show_default=True)
@click.option("--force", is_flag=True, help="overwrite an existing image")
def card_new(
    image: str,
    serial: str | None,
    algorithm: str,
    balance_fen: int,
    keys_path: str | None,
    pin: str,
    force: bool,
) -> None:
    """Personalize a new SIM with the transit e-purse and save it as IMAGE."""
    _refuse_overwrite(image, force)
    serial_bytes = _serial(serial, os.urandom(10))
    try:
        from otar.keys import DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID

        sim = personalize(
            serial_bytes,
            issuer=_issuer_keys(keys_path),
            algorithm=Algorithm.from_name(algorithm),
            balance_fen=balance_fen,
            pin=pin,
            ota_masters=(DEMO_OTA_MASTER_KIC, DEMO_OTA_MASTER_KID),
        )
    except ValueError as error:
        raise BadInput(str(error)) from None
    sim.save(image)
    click.echo(f"card {serial_bytes.hex().upper()} ({algorithm}) saved to {image}")


@card.command("new-driver")
@click.argument("image")
@click.option("--driver-id", required=True)
@click.option("--name", required=True)
@click.option("--operator", required=True)
@click.option("--fleet", default="", show_default=True)
@click.option("--serial", help="driver card serial, 20 hex digits")
@click.option("--expiry", type=click.DateTime(["%Y-%m-%d"]), default="2036-12-31")
@click.option("--force", is_flag=True)
def card_new_driver(
    image: str,
    driver_id: str,
    name: str,
    operator: str,
    fleet: str,
    serial: str | None,
    expiry: datetime,
    force: bool,
) -> None:
    """Issue a driver card (signs the driver in and out on a POS) as IMAGE."""
    _refuse_overwrite(image, force)
    try:
        data = DriverData(
            _serial(serial, os.urandom(10)), driver_id, operator, fleet, name, expiry.date()
        )
        data.encode()
    except ValueError as error:
        raise BadInput(str(error)) from None
    personalize_driver_card(data, driver_master_key=DEMO_DRIVER_MASTER_KEY).save(image)
    click.echo(f"driver card for {driver_id} ({name}) saved to {image}")


@card.command("show")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def card_show(image: str, as_json: bool) -> None:
    """Balance, counters and transaction log of IMAGE."""
    summary = describe(_load_sim(image))
    if as_json:
        click.echo(json.dumps(summary, indent=1, ensure_ascii=False))
        return
    for application in summary["applications"]:
        for key, value in application.items():
            if key != "log":
                click.echo(f"{key:>16}: {value}")
        for entry in application.get("log", []):
            click.echo(
                f"{'':>16}  CTC {entry['ctc']:>5}  {entry['type']:<8} {entry['amount_fen']:>8} fen"
                f"  terminal {entry['terminal_id']}  {entry['when']}"
            )


_TYPE_NAMES = {0x02: "load", 0x06: "purchase", 0x09: "compound"}


def describe(sim: Sim) -> dict[str, object]:
    applications: list[dict[str, object]] = []
    for application in sim.applications:
        if isinstance(application, TransitPurse):
            state = application.state
            public = PublicData.decode(state.public_data)
            log = [LogRecord.decode(raw) for raw in state.log]
            applications.append(
                {
                    "application": "transit e-purse",
                    "serial": public.serial.hex().upper(),
                    "algorithm": state.keys.algorithm.label,
                    "balance_fen": state.balance,
                    "balance": f"{state.balance / 100:.2f} yuan",
                    "online_ctc": state.online_ctc,
                    "offline_ctc": state.offline_ctc,
                    "valid": f"{public.start_date} .. {public.expiry_date}",
                    "blocked": state.blocked,
                    "pin_tries_left": state.pin_tries_left,
                    "log": [
                        {
                            "ctc": entry.ctc,
                            "type": _TYPE_NAMES.get(entry.transaction_type, "?"),
                            "amount_fen": entry.amount,
                            "terminal_id": entry.terminal_id.hex().upper(),
                            "when": entry.when.isoformat(sep=" "),
                        }
                        for entry in log
                    ],
                }
            )
        elif isinstance(application, DriverCard):
            driver = DriverData.decode(application.state.data)
            applications.append(
                {
                    "application": "driver card",
                    "serial": driver.serial.hex().upper(),
                    "driver_id": driver.driver_id,
                    "name": driver.name,
                    "operator": driver.operator_id,
                    "fleet": driver.fleet_id,
                    "expiry": str(driver.expiry_date),
                }
            )
    return {"iccid": sim.iccid, "applications": applications}


@card.command("load")
@click.argument("image")
@click.argument("amount_fen", type=click.IntRange(1, 0xFFFFFFFF))
@click.option("--keys", "keys_path", help="issuer master keys (JSON); default: demo keys")
@click.option("--terminal-id", default="000000000001", show_default=True)
def card_load(image: str, amount_fen: int, keys_path: str | None, terminal_id: str) -> None:
    """Load AMOUNT_FEN at a test load terminal holding the issuer keys."""
    sim = _load_sim(image)
    try:
        terminal_bytes = bytes.fromhex(terminal_id)
        assert len(terminal_bytes) == 6
    except (ValueError, AssertionError):
        raise BadInput("--terminal-id must be 12 hex digits") from None
    terminal = LoadTerminal(_issuer_keys(keys_path), terminal_bytes)
    result = terminal.load(InMemoryLink(sim), amount_fen)
    sim.save(image)
    if not isinstance(result, Loaded):
        click.echo(f"load refused: {result}", err=True)
        sys.exit(1)
    click.echo(
        f"loaded {amount_fen} fen, balance {result.balance_after} fen, "
        f"TAC {result.tac.hex().upper()}"
    )


@card.command("script")
@click.argument("image")
@click.argument("script_file", type=click.Path(dir_okay=False))
def card_script(image: str, script_file: str) -> None:
    """Send the C-APDUs of SCRIPT_FILE to IMAGE, checking expected responses."""
    sim = _load_sim(image)
    try:
        steps = parse_script(Path(script_file).read_text())
    except OSError as error:
        raise BadInput(f"cannot read {script_file}: {error.strerror}") from None
    except ScriptError as error:
        raise BadInput(f"{script_file}: {error}") from None
    results = run_script(InMemoryLink(sim), steps)
    sim.save(image)  # the card keeps what it did, as a real one would
    for result in results:
        click.echo(f"> {_spaced(result.step.command)}")
        click.echo(f"< {_spaced(result.response)}")
    if results and not results[-1].matches:
        last = results[-1]
        click.echo(
            f"{script_file}:{last.step.line}: expected {_spaced_text(last.step.expected or '')}, "
            f"got {_spaced(last.response)}",
            err=True,
        )
        sys.exit(1)


def _spaced(raw: bytes) -> str:
    return raw.hex(" ").upper()


def _spaced_text(hex_text: str) -> str:
    return " ".join(hex_text[i : i + 2] for i in range(0, len(hex_text), 2))


@card.command("serve")
@click.argument("image")
@click.option("--slot", type=click.IntRange(0, 15), default=0, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
def card_serve(image: str, slot: int, host: str) -> None:
    """Insert IMAGE into vpcd reader slot N until Ctrl-C, saving it as it changes."""
    from reader_sim.vpcd import VirtualCardServer

    sim = _load_sim(image)
    saved_commits = sim.power.commits

    def save_if_changed(command: bytes, answer: bytes) -> None:
        nonlocal saved_commits
        if sim.power.commits != saved_commits:
            sim.save(image)
            saved_commits = sim.power.commits

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = VirtualCardServer(sim, slot=slot, host=host, on_apdu=save_if_changed)
    vpcd_address = f"{host}:{server.address[1]}"
    try:
        server.connect(timeout_s=10)
    except OSError as error:
        raise BadInput(f"cannot reach vpcd at {vpcd_address}: {error}") from None
    click.echo(f"card in reader slot {slot} ({vpcd_address}); Ctrl-C removes it")
    try:
        server.serve_forever(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        sim.save(image)


@click.group()
def pos() -> None:
    """The bus POS: taps and its record store."""


@pos.command("tap")
@click.argument("image")
@click.option("--pos", "pos_file", required=True, help="POS configuration (JSON)")
@click.option("--at", "at", type=click.DateTime(), help="the POS clock (default: now)")
def pos_tap(image: str, pos_file: str, at: datetime | None) -> None:
    """Tap IMAGE (a phone or a driver card) once on the POS of POS.json."""
    sim = _load_sim(image)
    clock = (lambda: at) if at else datetime.now
    try:
        bus_pos = open_pos(pos_file, clock=clock)
    except PosFileError as error:
        raise BadInput(str(error)) from None
    try:
        outcome = bus_pos.present(InMemoryLink(sim))
    finally:
        bus_pos.store.close()
    sim.save(image)
    click.echo(outcome.message)
    if outcome.record is not None:
        click.echo(json.dumps(outcome.record.to_json(), ensure_ascii=False))
    if outcome.outcome in (Outcome.REFUSED, Outcome.CARD_REMOVED):
        sys.exit(1)


@pos.command("records")
@click.option("--pos", "pos_file", required=True, help="POS configuration (JSON)")
def pos_records(pos_file: str) -> None:
    """Print the POS's stored fare records, one JSON object per line."""
    try:
        bus_pos = open_pos(pos_file)
    except PosFileError as error:
        raise BadInput(str(error)) from None
    try:
        for record in bus_pos.store.iter_records():
            click.echo(json.dumps(record.to_json(), ensure_ascii=False))
    finally:
        bus_pos.store.close()


@click.group()
def bank() -> None:
    """The simulated bank: bank cards, payments, refunds, signed webhooks."""


@bank.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8090, show_default=True)
@click.option("--db", "db_path", default="instance/bank.sqlite", show_default=True)
@click.option(
    "--secret",
    envvar="BANK_WEBHOOK_SECRET",
    required=True,
    help="the Standard Webhooks secret shared with the platform: whsec_ + the key in base64",
)
@click.option(
    "--merchant",
    "merchants",
    multiple=True,
    metavar="ID=CALLBACK_URL",
    help="a merchant and the URL its webhooks go to",
)
def bank_serve(host: str, port: int, db_path: str, secret: str, merchants: tuple[str, ...]) -> None:
    """Serve the bank over HTTP and send its webhooks."""
    from reader_sim.bank import Bank, webhook_key
    from reader_sim.bank_http import serve_bank
    from wallet_service.http_server import CannotListen

    try:
        webhook_key(secret)
    except ValueError as error:
        raise BadInput(f"--secret: {error}") from None
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    the_bank = Bank(db_path)
    try:
        for item in merchants:
            merchant, _, url = item.partition("=")
            if not merchant or not url.startswith("http"):
                raise BadInput(f"--merchant wants ID=URL, got {item!r}")
            the_bank.add_merchant(merchant, url)
    finally:
        the_bank.close()  # (the server's worker opens its own)
    try:
        serve_bank(host, port, db_path, secret, on_listening=click.echo)
    except CannotListen as error:
        raise BadInput(str(error)) from None


@click.group()
def smsc() -> None:
    """The simulated SMS centre (store-and-forward, with faults for tests)."""


@smsc.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8070, show_default=True)
@click.option("--delay-ms", type=click.IntRange(0), default=0, show_default=True)
@click.option("--loss", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--duplicate", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def smsc_serve(
    host: str, port: int, delay_ms: int, loss: float, duplicate: float, seed: int
) -> None:
    """Serve the SMS centre over HTTP."""
    from reader_sim import smsc_server
    from wallet_service.http_server import CannotListen

    settings = smsc_server.Settings(delay_ms, loss, duplicate, seed)
    try:
        smsc_server.serve(host, port, settings, on_listening=click.echo)
    except CannotListen as error:
        raise BadInput(str(error)) from None


def _ota_domain(sim: Sim):  # type: ignore[no-untyped-def]
    if sim.ota is None:
        raise BadInput("this card image has no OTA keys")
    return sim.ota


def _parse_hex(value: str, what: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise BadInput(f"{what} is not hex: {value[:40]!r}") from None


@card.command("ota")
@click.argument("image")
@click.argument("packet_hex")
@click.option("--originator", default="10658888", show_default=True)
def card_ota(image: str, packet_hex: str, originator: str) -> None:
    """Hand one SMS-PP command packet (CPL onwards, no UDH: ota.md §1, as ota encode
    prints it) to the SIM in an ENVELOPE; save the image; print the PoR (its UDH 02 71 00
    first). No PoR (a packet the SIM cannot read, or whose SPI asks for none): why, on
    stderr, and exit 1."""
    from otar.sms import encode_envelope, encode_sms_deliver
    from sim_applet.apdu import split_response

    sim = _load_sim(image)
    _ota_domain(sim)
    packet = _parse_hex(packet_hex, "PACKET_HEX")
    try:
        envelope = encode_envelope(encode_sms_deliver(originator, packet))
    except ValueError as error:
        raise BadInput(str(error)) from None
    data, sw = split_response(sim.transmit(envelope))
    sim.save(image)
    if sw != 0x9000:
        click.echo(f"the SIM answered {sw:04X}", err=True)
        sys.exit(1)
    if not data:
        click.echo(f"no Proof of Receipt: {_why_no_por(packet)}", err=True)
        sys.exit(1)
    click.echo(data.hex().upper())


def _why_no_por(packet: bytes) -> str:
    from otar.packets import OtaError, PorRequest, peek_header

    try:
        spi, _, _, _ = peek_header(packet)
    except OtaError as error:
        return (
            f"the SIM cannot read the packet's header ({error}); a command packet is "
            "CPL(2) CHL(1) SPI(2) KIc(1) KID(1) TAR(3) then the secured data (ota.md §1)"
        )
    if spi.por is PorRequest.NEVER:
        return "the packet's SPI asks for none (SPI byte 2, bits 1-2: 00)"
    if spi.por is PorRequest.ON_ERROR:
        return "the packet's SPI asks for one only on error (SPI byte 2, bits 1-2: 10)"
    return "the SIM sent none"  # not reached: a readable packet asking for one gets one


@card.command("ota-keys")
@click.argument("image")
def card_ota_keys(image: str) -> None:
    """Print the SIM's OTA keyset as JSON, named as pySim's OtaKeyset (test images only:
    the platform never prints a production card's keys)."""
    from otar.sim_side import TRANSIT_TAR

    domain = _ota_domain(_load_sim(image))
    index, keys = next(iter(sorted(domain.keysets.items())))
    counter = _next_counter(domain, index)
    click.echo(
        json.dumps(
            {
                "algo_crypt": keys.algo_crypt,
                "kic_idx": keys.kic_idx,
                "kic": keys.kic.hex(),
                "algo_auth": keys.algo_auth,
                "kid_idx": keys.kid_idx,
                "kid": keys.kid.hex(),
                "cntr": counter,
                "tar": TRANSIT_TAR.hex(),
            }
        )
    )
    if counter is None:
        click.echo(_COUNTER_EXHAUSTED, err=True)
        sys.exit(1)


_COUNTER_EXHAUSTED = (
    "the SIM's OTA counter is exhausted: its last packet had counter FFFFFFFFFF, the highest "
    "of CNTR's 5 bytes, so the SIM takes no further packet under these keys (a new key "
    "version carries the counter over)"
)


def _next_counter(domain, index: int) -> int | None:  # type: ignore[no-untyped-def]
    """The counter of the next packet under keyset ``index``; None when exhausted."""
    from otar.packets import counter_max

    counter = domain.last_counters.get(index, -1) + 1
    return counter if counter <= counter_max else None


@click.group()
def ota() -> None:
    """Secured OTA packets, as the platform builds them."""


@ota.command("encode")
@click.argument("image")
@click.argument("apdus_hex", nargs=-1, required=True)
def ota_encode(image: str, apdus_hex: tuple[str, ...]) -> None:
    """The command packet the platform would send to IMAGE's SIM for APDUS_HEX (ciphered,
    CC, counter one above the SIM's last), in hex. At most 16 APDUs, in one SMS: the
    packet at most 137 bytes (140 with its header 02 70 00)."""
    from otar.packets import Spi, encode_command
    from otar.remote_apdu import decode_script, encode_script
    from otar.sim_side import TRANSIT_TAR

    domain = _ota_domain(_load_sim(image))
    index, keys = next(iter(sorted(domain.keysets.items())))
    counter = _next_counter(domain, index)
    if counter is None:
        raise click.ClickException(_COUNTER_EXHAUSTED)  # the card's state: exit 1
    apdus = [_parse_hex(apdu, "APDU") for apdu in apdus_hex]
    try:
        script = encode_script(apdus)
        decode_script(script)  # the SIM must be able to split it again
        packet = encode_command(keys, Spi(), TRANSIT_TAR, counter, script)
    except ValueError as error:
        raise BadInput(f"cannot script these APDUs: {error}") from None
    click.echo(packet.hex().upper())
