"""The database: one engine per app, sessions for service functions.

Created unbound and ``init_app``-ed (nothing at import time). Service functions receive a
``Session`` and run inside ``transaction()``; the edges never touch SQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Table,
    Update,
    bindparam,
    create_engine,
    event,
    inspect,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    InvalidatePoolError,
    OperationalError,
)
from sqlalchemy.orm import DeclarativeBase, Session, make_transient_to_detached, sessionmaker
from sqlalchemy.orm.attributes import PASSIVE_NO_INITIALIZE, get_history

T = TypeVar("T")
C = TypeVar("C")
B = TypeVar("B", bound="Base")
serialization_retries_max = 5


class Base(DeclarativeBase):
    pass


_updates_by_id: dict[Table, Update] = {}
_updates_by_ids: dict[Table, Update] = {}


def write_now(session: Session, row: Base) -> None:
    """What a flush would write for ``row``, as one plain UPDATE by its id: its changed
    columns. The ORM then holds those values as committed, so no flush writes them again.
    For the worker's hot paths: the unit of work costs about four times the UPDATE's own
    CPU there. Call it before any other write or ORM query in the transaction, which would
    flush ``row`` the costly way first. A rolled-back transaction or savepoint takes the
    UPDATE with it, like any other.

    Outside a savepoint the UPDATE is held until the session's next statement, flush,
    savepoint or commit, and goes with the other rows held meanwhile — those of a table
    changed in the same columns in one executemany (``_write_held``): a batch of orders
    stepped one after another costs one round trip, not one each, and nothing can read the
    database before it is written. Inside a savepoint it runs at once (a failure is then
    that savepoint's)."""
    state = inspect(row)
    if not state.modified or state.identity is None:  # unchanged, or not inserted yet
        return
    values = _changed_columns(state)
    if values:
        table = state.mapper.local_table
        if table not in _updates_by_id:  # built once per table (rows with an "id" key)
            _updates_by_id[table] = update(table).where(table.c.id == bindparam("row_id"))
        if session.get_nested_transaction() is None:
            _held_writes(session).rows.setdefault((table, state.identity[0]), {}).update(values)
        else:
            with session.no_autoflush:  # (an autoflush would write the row the costly way)
                session.execute(_updates_by_id[table], {"row_id": state.identity[0], **values})
    _written(session, row)


@dataclass
class _HeldWrites:
    connection: Connection  # the transaction's own (a savepoint's first statement is later)
    rows: dict[tuple[Table, object], dict] = field(default_factory=dict)  # (table, id) → values


# ``write_now``'s UPDATEs held in Session.info until written; forgotten (not written) when
# the transaction ends without them, rolled back.
_HELD_WRITES = "held_writes"


def _held_writes(session: Session) -> _HeldWrites:
    held = session.info.get(_HELD_WRITES)
    if held is None:
        held = transaction_cache(session, _HELD_WRITES, lambda: _HeldWrites(session.connection()))
    return held


def _write_held(session: Session) -> None:
    """The held UPDATEs, on the transaction's connection: one executemany per table and set
    of columns, in the order first held."""
    held = session.info.pop(_HELD_WRITES, None)
    if held is None or not held.rows:
        return
    alike: dict[tuple[Table, tuple[str, ...]], list[dict]] = {}
    for (table, row_id), values in held.rows.items():
        alike.setdefault((table, tuple(values)), []).append({"row_id": row_id, **values})
    for (table, _), parameters in alike.items():
        held.connection.execute(_updates_by_id[table], parameters)


# A statement with this execution option set goes before the held UPDATEs (``write_now``):
# one that cannot see what they change — an INSERT of a new row whose unique keys no
# UPDATE here changes (a top-up order's request and reference are set once). Between a
# batch's proofs of receipt, each request's order then leaves the UPDATEs held: the
# batch's go in one executemany at commit, not one before each request.
BLIND_TO_HELD_WRITES = "blind_to_held_writes"


@event.listens_for(Session, "do_orm_execute")
def _write_held_before_a_statement(execution) -> None:  # type: ignore[no-untyped-def]
    if not execution.execution_options.get(BLIND_TO_HELD_WRITES):
        _write_held(execution.session)


@event.listens_for(Session, "before_flush")
def _write_held_before_a_flush(session: Session, _context, _instances) -> None:  # type: ignore[no-untyped-def]
    _write_held(session)


@event.listens_for(Session, "after_transaction_create")
def _write_held_before_a_savepoint(session: Session, transaction) -> None:  # type: ignore[no-untyped-def]
    """(A savepoint's SAVEPOINT is sent with its first statement: the held UPDATEs go on
    the transaction's connection first, outside it.)"""
    if transaction.nested:
        _write_held(session)


def as_loaded(session: Session, model: type[B], values: dict) -> B:
    """The row just inserted with ``values`` (columns left out were NULL), as the session's
    object for it: as a query would have loaded it, without the query. For the worker's hot
    paths, where an ORM INSERT … RETURNING the entity costs several times a Core one."""
    # Its attributes put in place as a load puts them (no change events: the constructor's
    # cost the worker's hot path several times the rest)
    row = model.__mapper__.class_manager.new_instance()
    row.__dict__.update({column.key: None for column in model.__table__.c} | values)
    make_transient_to_detached(row)  # (so it counts as loaded: its identity, all committed)
    session.add(row)
    inserted_in = session.get_nested_transaction() or session.get_transaction()
    transaction_cache(session, _INSERTED_NOW, list).append((row, inserted_in))
    return row


# Rows ``as_loaded`` made, with the savepoint (or transaction) their INSERT ran in, until
# the transaction ends. The ORM takes out of the session the objects it inserted when their
# savepoint rolls back; these it takes for loaded ones, which stay — and on SQLite, where a
# rolled-back id is given again, the next row's object would clash with the stale one.
_INSERTED_NOW = "rows_inserted_now"


@event.listens_for(Session, "after_soft_rollback")
def _expunge_inserted_now(session: Session, rolled_back) -> None:  # type: ignore[no-untyped-def]
    inserted = session.info.get(_INSERTED_NOW)
    if not inserted:
        return
    kept = []
    for row, inserted_in in inserted:
        if _inside(inserted_in, rolled_back):
            if row in session:
                session.expunge(row)
        else:
            kept.append((row, inserted_in))
    inserted[:] = kept


def _inside(transaction, outer) -> bool:  # type: ignore[no-untyped-def]
    """``transaction`` is ``outer`` or was begun inside it (released or not)."""
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


def write_all_now(session: Session, rows: list[Base]) -> None:
    """``write_now`` for several rows: those of one table changed to the same values are
    written by one UPDATE of all their ids (a batch's events, all processed now)."""
    alike: dict[tuple, list[Base]] = {}
    for row in rows:
        state = inspect(row)
        if state.modified and state.identity is not None:
            values = tuple(sorted(_changed_columns(state).items()))
            alike.setdefault((state.mapper.local_table, values), []).append(row)
    for (_, values), same in alike.items():
        if len(same) > 1 and values:
            _update_all(session, same, dict(values))
        else:
            for row in same:
                write_now(session, row)


def _update_all(session: Session, rows: list[Base], values: dict) -> None:
    table = inspect(rows[0]).mapper.local_table
    if table not in _updates_by_ids:  # built once per table
        _updates_by_ids[table] = update(table).where(
            table.c.id.in_(bindparam("row_ids", expanding=True))
        )
    ids = [inspect(row).identity[0] for row in rows]
    with session.no_autoflush:
        session.execute(_updates_by_ids[table], {"row_ids": ids, **values})
    for row in rows:
        _written(session, row)


def _changed_columns(state) -> dict:  # type: ignore[no-untyped-def]
    """Column → value of the attributes set since the load (committed_state holds their
    old values). Each one's history as ``AttributeState.history`` reads it, asked of it
    alone: ``state.attrs`` makes a state for every attribute at each access."""
    columns, row = state.mapper.column_attrs, state.obj()
    return {
        columns[key].columns[0].key: getattr(row, key)
        for key in state.committed_state
        if get_history(row, key, PASSIVE_NO_INITIALIZE).has_changes()
    }


def _written(session: Session, row: Base) -> None:
    """What a flush does once it has written a row (the models have column attributes
    only, all written now): nothing pending, and out of the session's dirty set."""
    state = inspect(row)
    state._commit_all(state.dict, session.identity_map)
    transaction_cache(session, _WRITTEN_NOW, set).add(row)


# Rows ``write_now`` wrote in the session's transaction, until it ends. A flushed row that
# a savepoint's rollback takes back is expired by the ORM (read again when next used);
# these the ORM does not know were written, so any rollback — of any savepoint, however
# deep — expires all of them (one written outside it is merely read again).
_WRITTEN_NOW = "rows_written_now"


@event.listens_for(Session, "after_soft_rollback")
def _expire_written_now(session: Session, _transaction) -> None:  # type: ignore[no-untyped-def]
    for row in session.info.get(_WRITTEN_NOW, ()):
        if row in session:
            session.expire(row)


# Session.info keys of what ``transaction_cache`` keeps → also forgotten when a savepoint
# ends (else only when the transaction does).
_transaction_caches: dict[str, bool] = {}


def transaction_cache(
    session: Session, key: str, empty: Callable[[], C], *, savepoints: bool = False
) -> C:
    """What a transaction keeps in ``session.info[key]`` (made by ``empty`` the first
    time): forgotten when the transaction ends — committed or not — and, with
    ``savepoints``, when any savepoint ends too (one rolled back may take back the rows
    it was read from). Not when a flush's own inner transaction ends."""
    _transaction_caches[key] = savepoints
    return session.info.setdefault(key, empty())


@event.listens_for(Session, "after_transaction_end")
def _forget_transaction_caches(session: Session, transaction) -> None:  # type: ignore[no-untyped-def]
    ended = "transaction" if transaction.parent is None else "savepoint"
    if ended == "savepoint" and not transaction.nested:
        return  # a flush's inner transaction
    # (a copy: the other worker thread may add a key meanwhile, its first use)
    for key, at_savepoints in tuple(_transaction_caches.items()):
        if ended == "transaction" or at_savepoints:
            session.info.pop(key, None)


# Work done inside each transaction just before it commits (``at_commit``).
CommitHook = Callable[[Session], None]
_commit_hooks: list[tuple[str, CommitHook]] = []  # (work key, hook)
# The innermost savepoint open at the last ``before_commit``, until it closes.
_COMMITTING_THROUGH = "commit_through_savepoint"


def at_commit(work_key: str) -> Callable[[CommitHook], CommitHook]:
    """Run the hook (``hook(session)``) inside every transaction that holds work for it in
    ``session.info[work_key]``, just before it commits — once, and not as a savepoint is
    released. ``before_commit`` comes before a savepoint's release
    too, and a transaction committed with savepoints still open has its own come first,
    then theirs, innermost first (SQLAlchemy releases them for it): so the innermost
    savepoint seeing ``before_commit`` twice before it closes is being committed through,
    and the hooks run then, inside it (released right after). With more than one savepoint
    open that is refused (``SavepointsLeftOpen``). Nothing here commits with savepoints
    open: ``begin_nested`` blocks close theirs. On PostgreSQL the hooks'
    statements are pipelined (``_pipelined``): they read nothing back. A transaction with
    no such work pays nothing (a pipeline costs a round trip even when empty)."""

    def register(hook: CommitHook) -> CommitHook:
        _commit_hooks.append((work_key, hook))
        return hook

    return register


def _commit_work_held(session: Session) -> bool:
    """Whether the transaction holds work for a commit hook (``at_commit``)."""
    return any(session.info.get(work_key) for work_key, _ in _commit_hooks)


@event.listens_for(Session, "before_commit")
def _committing(session: Session) -> None:
    savepoint = session.get_nested_transaction()
    if savepoint is not None and session.info.get(_COMMITTING_THROUGH) is not savepoint:
        session.info[_COMMITTING_THROUGH] = savepoint  # a release, unless a second comes
        return
    if not _commit_work_held(session):
        return
    session.flush()  # (what the unit of work holds goes first: it reads its row counts)
    due = [hook for work_key, hook in _commit_hooks if session.info.get(work_key)]
    if not due:  # (the flush wrote the held UPDATEs, and they were all there was)
        return
    if savepoints_open(session) > 1:
        raise SavepointsLeftOpen(
            "a commit with more than one savepoint open and work to do as it commits: "
            "commit the savepoints first"
        )
    with session.no_autoflush, _pipelined(session):
        for hook in due:
            hook(session)


@contextmanager
def _pipelined(session: Session) -> Iterator[None]:
    """On PostgreSQL, the statements sent meanwhile go without waiting for each answer
    (psycopg's pipeline mode), and are answered together as it ends: the commit hooks'
    held UPDATEs, INSERTs and ledger totals cost one round trip, not one each. So those
    statements read nothing back — no rows, no row counts (an INSERT is ``inline()``: no
    id returned; no ORM flush runs in it). An error
    answered then is raised as SQLAlchemy raises one (an ``IntegrityError`` for a unique
    key taken: retried, or the worker's batch done again one message at a time)."""
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        yield
        return
    import psycopg

    try:
        with connection.connection.dbapi_connection.pipeline():
            yield
    except psycopg.Error as error:  # (a connection lost then: said so, as SQLAlchemy does)
        raw = connection.connection.dbapi_connection
        lost = connection.dialect.is_disconnect(error, raw, None)
        raise DBAPIError.instance(
            None, None, error, psycopg.Error, connection_invalidated=lost
        ) from None


@event.listens_for(Session, "after_transaction_end")
def _committed_through(session: Session, transaction) -> None:  # type: ignore[no-untyped-def]
    if session.info.get(_COMMITTING_THROUGH) is transaction:
        del session.info[_COMMITTING_THROUGH]


def savepoints_open(session: Session) -> int:
    count, transaction = 0, session.get_nested_transaction()
    while transaction is not None:
        count, transaction = count + transaction.nested, transaction.parent
    return count


class SavepointsLeftOpen(RuntimeError):
    """A commit with more than one savepoint open and work to do as it commits: done inside
    the innermost, a rollback of its parent could take it while the transaction commits."""


# Rows ``insert_at_commit`` holds until the transaction commits: id(statement) →
# (statement, rows), in the order first asked. Forgotten when the transaction ends.
_INSERTS_AT_COMMIT = "inserts_at_commit"


def insert_at_commit(session: Session, statement: Insert, row: dict) -> None:
    """Insert ``row`` as the transaction commits, with its other rows of ``statement`` in
    one executemany — one round trip for all (psycopg pipelines it), not one each. For rows
    nothing reads back in their transaction (audit events, ledger transfers: ``pending``
    answers for those): under load, a round trip waits for both cores' other work, and the
    worker's SMS loop spent a fifth of its time waiting on these INSERTs. Inside a savepoint
    the row is inserted at once, so its failure (a unique key taken) is that savepoint's, as
    the worker's one savepoint per message wants. A rolled-back transaction takes them.
    (So a held row and one of a savepoint that clash on a unique key fail the commit, not
    the savepoint: nothing here posts both.)"""
    if session.get_nested_transaction() is not None:
        session.execute(statement, row)
        return
    pending = transaction_cache(session, _INSERTS_AT_COMMIT, dict)
    pending.setdefault(id(statement), (statement, []))[1].append(row)


def pending(session: Session, statement: Insert) -> list[dict]:
    """The rows of ``statement`` that ``insert_at_commit`` holds, not inserted yet."""
    held = session.info.get(_INSERTS_AT_COMMIT, {}).get(id(statement))
    return held[1] if held else []


at_commit(_HELD_WRITES)(_write_held)


@at_commit(_INSERTS_AT_COMMIT)
def _insert_held_rows(session: Session) -> None:
    for statement, rows in session.info.pop(_INSERTS_AT_COMMIT).values():
        session.execute(statement, rows)


# What PostgreSQL ends rather than wait on for ever: a request or a worker stuck on a lock
# would otherwise hold its thread, and a worker hung inside a transaction (stopped, its
# host frozen: not killed, which closes its connection) would hold the orders it claimed,
# which the others skip (SKIP LOCKED). The API answers a cancelled statement 503; the
# worker rolls back and does the work again next pass.
statement_timeout_s_default = 30.0  # one statement, its lock waits included
# Longer than the longest wait inside a transaction: the bank's answer to a refund asked
# with the order claimed (``worker.request_timeout_s``, 10 s).
idle_in_transaction_timeout_s_default = 60.0


@dataclass(frozen=True)
class SessionLimits:
    """Per-connection limits on PostgreSQL, in seconds, to the millisecond; 0: not set
    here (the server's, the role's or the database's own: none by default). (SQLite: in
    process, a writer waits for the file's lock up to its own 30 s busy timeout.)"""

    statement_timeout_s: float = statement_timeout_s_default
    idle_in_transaction_timeout_s: float = idle_in_transaction_timeout_s_default

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (value == 0 or 0.001 <= value <= 86_400):
                raise ValueError(f"{name} is 0 (not set) or 0.001 to 86400 seconds, not {value}")

    def startup_options(self) -> str:
        """libpq's ``options``: set as each connection starts, no round trip of their own."""
        settings = (
            ("statement_timeout", self.statement_timeout_s),
            ("idle_in_transaction_session_timeout", self.idle_in_transaction_timeout_s),
        )
        return " ".join(f"-c {name}={round(s * 1000)}" for name, s in settings if s)


def _startup_options(url: str, limits: SessionLimits) -> str:
    """Ours, then PGOPTIONS', then the URL's (``options=``, given once or more): the later
    a setting, the more it wins — so what whoever runs the platform set is kept. (Given
    to the driver, ``options`` would replace PGOPTIONS, not add to it.)"""
    given = make_url(url).query.get("options", ())
    in_url = [given] if isinstance(given, str) else list(given)
    parts = [limits.startup_options(), os.environ.get("PGOPTIONS", ""), *in_url]
    return " ".join(part for part in parts if part)


def make_engine(url: str, limits: SessionLimits | None = None) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):  # type: ignore[no-untyped-def]
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection):  # type: ignore[no-untyped-def]
            # SQLite's default deferred transactions fail with "database is locked" when two
            # writers upgrade at once; taking the write lock up front serializes them.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    options = _startup_options(url, limits or SessionLimits())
    engine = create_engine(
        url,
        pool_size=10,
        max_overflow=20,
        # (none given: libpq's own, a service file's included)
        connect_args={"options": options} if options else {},
    )
    _ping_connections_idle_a_while(engine)
    return engine


pool_ping_after_idle_s = 1.0


def _ping_connections_idle_a_while(engine: Engine) -> None:
    """A pooled connection idle longer than ``pool_ping_after_idle_s`` is pinged as it is
    checked out, and replaced if the database dropped it (a restart, an idle timeout): what
    ``pool_pre_ping`` does on every checkout, which costs a round trip a transaction — the
    worker runs several per top-up. One used within the second is not pinged: the database
    gone meanwhile, its transaction fails (as one under way then does), and the pool is
    renewed for the next."""

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        record.info["idle_from"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        idle_from = record.info.get("idle_from")
        if idle_from is None or time.monotonic() - idle_from <= pool_ping_after_idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                # (the database went: its other pooled connections too, as pool_pre_ping)
                raise InvalidatePoolError(f"the database dropped a connection: {error}") from error
            raise DisconnectionError(f"a pooled connection failed its ping: {error}") from error


_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


def the_database_failed(error: BaseException) -> bool:
    """A deadlock, an outage, the connection ended — not the work's own fault, and worth
    doing again. (psycopg raises a transaction ended for idling as an InternalError, the
    connection gone with it.)"""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


class NotOneStatement(RuntimeError):
    """Work run as one statement (``Database.run``) held writes for its commit: in
    autocommit they would not be all-or-nothing with its statement."""


_ONE_STATEMENT = "wallet.one_statement"  # (connection.info: while work runs as one)


@dataclass
class _OneStatement:
    connection: Connection  # the mark's own: one left on a pooled connection binds no other
    sent: bool = False


@contextmanager
def _one_statement_only(connection: Connection) -> Iterator[None]:
    """Meanwhile a second statement on ``connection`` is refused before it is sent (in
    autocommit the first is committed already; the work fails loudly, not half-done) — by
    ``_refuse_a_second_statement``, on every engine ``Database`` binds, once: a listener
    added and removed around each piece of work cost some 7 % of a bank callback's CPU
    (in process, 1.75–1.95 → 1.64–1.80 ms)."""
    info = connection.info  # (read now: on a connection lost meanwhile, reading it raises)
    mark = info[_ONE_STATEMENT] = _OneStatement(connection)
    try:
        yield
    finally:  # (ours only: a connection lost goes back to the pool, its info to another)
        if info.get(_ONE_STATEMENT) is mark:
            del info[_ONE_STATEMENT]


def _refuse_a_second_statement(connection, _cursor, statement, *_) -> None:  # type: ignore[no-untyped-def]
    mark = connection.info.get(_ONE_STATEMENT)
    if mark is None or mark.connection is not connection:
        return
    if mark.sent:
        raise NotOneStatement(f"a second statement in work run as one: {statement[:60]}")
    mark.sent = True


def _holds_writes(session: Session) -> bool:
    return _commit_work_held(session) or bool(session.new or session.dirty or session.deleted)


class Database:
    def __init__(self) -> None:
        self.engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    def init_app(self, app) -> None:  # type: ignore[no-untyped-def]
        limits = SessionLimits(
            app.config["DB_STATEMENT_TIMEOUT_S"], app.config["DB_IDLE_IN_TRANSACTION_TIMEOUT_S"]
        )
        self.bind(make_engine(app.config["DATABASE_URL"], limits))
        app.extensions["database"] = self

    def check_before_every_commit(self, check: Callable[[Session], None]) -> None:
        """Run ``check`` inside every transaction just before it commits (a failing check
        rolls the transaction back): the ledger's balance invariant, in tests and audits."""
        assert self._sessions is not None

        @event.listens_for(self._sessions, "before_commit")
        def _check(session: Session) -> None:
            check(session)

    def bind(self, engine: Engine) -> None:
        if engine.url.get_backend_name() == "sqlite":
            # pysqlite's own transaction handling would defeat BEGIN IMMEDIATE above.
            @event.listens_for(engine, "connect")
            def _no_pysqlite_begin(connection, _record):  # type: ignore[no-untyped-def]
                connection.isolation_level = None

        # (once an engine: SQLAlchemy adds a listener only once, however often bound)
        event.listen(engine, "before_cursor_execute", _refuse_a_second_statement)
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def transaction(self, one_statement: bool = False) -> Iterator[Session]:
        """``one_statement``: the work is one statement, its own transaction on PostgreSQL
        (autocommit: no BEGIN and no COMMIT sent, two round trips of three saved)."""
        assert self._sessions is not None, "Database not bound"
        with self._sessions() as session, session.begin():
            if not one_statement:
                yield session
                return
            # (SQLite: in process, no round trip to save; its transactions begin IMMEDIATE.)
            autocommit = _AUTOCOMMIT if session.get_bind().dialect.name == "postgresql" else {}
            with _one_statement_only(session.connection(execution_options=autocommit)):
                yield session
            if _holds_writes(session):
                raise NotOneStatement("work run as one statement left writes to send at commit")

    def run(self, work: Callable[[Session], T], one_statement: bool = False) -> T:
        """Run ``work`` in one transaction, retrying when it lost a race: a serialization
        failure or deadlock, or a uniqueness violation (a concurrent twin inserted first;
        the retry sees its row and answers accordingly). The work is all-or-nothing, so a
        retry is safe; a conflict that persists is raised. ``one_statement``: the work
        runs a single statement, which is then its transaction (``transaction``)."""
        for attempt in range(serialization_retries_max):
            try:
                with self.transaction(one_statement) as session:
                    return work(session)
            except (OperationalError, IntegrityError) as error:
                code = getattr(error.orig, "sqlstate", None)
                retryable = isinstance(error, IntegrityError) or code in ("40001", "40P01")
                if not retryable or attempt == serialization_retries_max - 1:
                    raise
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
