"""A few hot statements run straight on the driver's connection, inside SQLAlchemy's
transaction.

Owns compiling a Core statement once per dialect (its SQL text, the order of its parameters,
the type processors of each one, the values of literal parameters, written into the SQL
where the paramstyle names parameters (PostgreSQL), and, for an INSERT, the Python-side
defaults of the columns not given) and running it on the DB-API connection under
a SQLAlchemy `Connection`. SQLAlchemy's per-execution work (cache key, execution context,
result wrapping) takes tens of microseconds a statement, more than SQLite takes to run one;
for the statements of a placement decision it was most of the decision. Same SQL, same
transaction, same values as `Connection.execute` would send; driver errors come out as
SQLAlchemy's (`DBAPIError.instance`), and a lost connection is invalidated as SQLAlchemy
would. Not for anything that needs ORM events, SQL logging or result rows as SQLAlchemy
types: callers get the driver's cursor (rowcount, fetchone).

On PostgreSQL a statement marked `direct` (a placement decision's claim) goes further when
its connection is in autocommit (a `Store.transaction(single_statement=True)`: the decision
is that one statement): it is prepared once per connection under a name of its own and run
with libpq's PQexecPrepared through psycopg's `pgconn`, its parameters given as text (each
has an explicit cast in the SQL, so the server needs no types), each name once. psycopg's
own execute (query conversion, adapting every value, its prepared-statement bookkeeping, a
non-blocking send and wait) cost about as much client CPU as the round trip itself.
psycopg's binding releases the GIL while libpq waits. Not inside a transaction of several
statements (the create's): psycopg deallocates every prepared statement of a connection
after a rollback, and a statement found gone there would abort the transaction, where in
autocommit it is simply prepared again.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Connection, Insert, String, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

_TOKENS = re.compile(r"%%|%\((\w+)\)s")
"""A parameter in the pyformat paramstyle (psycopg), or an escaped % (group 1 empty)."""

_POSITIONAL = re.compile(r"%%|%s")
"""A positional parameter in the format paramstyle, or an escaped %."""

_PREPARED = "virtfleet.fast.prepared"
"""Where a DB-API connection's `info` keeps the names of the direct statements prepared on
it (PostgreSQL)."""

_names = itertools.count(1)

_CURSOR = "virtfleet.fast.cursor"
"""Where a DB-API connection's `info` keeps the cursor FastStatements run on (PostgreSQL):
a new cursor for each statement costs more than adapting its parameters."""


def column_default(col: Any) -> Callable[[], Any] | None:
    """What Core's INSERT would put into `col` when given no value: its Python-side default
    as a function of nothing; None when it has none (or a sequence or SQL expression,
    left to the database)."""
    default = col.default
    if default is None:
        return None
    if default.is_scalar:
        return (lambda v: lambda: v)(default.arg)
    if default.is_callable:
        return (lambda f: lambda: f(None))(default.arg)
    return None


def is_constant(make: Callable[[], Any]) -> bool:
    """A default that gives the same value each time (an empty list or dict made afresh
    counts): worked out once, not at every row."""
    first, second = make(), make()
    return first is second or (isinstance(first, dict | list) and not first
                               and type(first) is type(second) and first == second)


def _literal(impl: Any, dialect: Dialect, value: Any) -> str | None:
    """`value` as an SQL literal of type `impl` (None: leave it a parameter). Only plain
    values whose rendering SQLAlchemy owns: integers, strings, JSON documents."""
    if value is None or isinstance(value, bool) or not isinstance(
            value, int | str | list | dict):
        return None
    if isinstance(impl, JSON):  # no literal rendering of its own: JSON text, quoted
        serialize = getattr(dialect, "_json_serializer", None) or json.dumps
        value, impl = serialize(value), String()
    try:
        render = impl.literal_processor(dialect)
    except NotImplementedError:
        return None
    return None if render is None else str(render(value))


@dataclass(frozen=True)
class _Compiled:
    sql: str
    order: tuple[str, ...] | None
    """Parameter names in the order a positional paramstyle wants them; None: by name."""
    literals: dict[str, Any]
    """Values of the statement's own parameters (e.g. the 1 of `generation + 1`), already
    through their type's processor (worked out once); those written into `sql` are not
    here."""
    processors: dict[str, Callable[[Any], Any]]
    defaults: dict[str, Callable[[], Any]]
    """INSERT columns the caller does not give, with their Python-side default."""
    constants: dict[str, Any]
    """Of those, the ones whose default is a constant or an empty list or dict (`default=list`),
    already through their type's processor (e.g. JSON text): worked out once."""
    prepare: bool
    direct: _Direct | None = None


class _NotDirect(Exception):
    """A value the direct path does not write as text itself (psycopg adapts it)."""


def _text(value: Any) -> bytes | None:
    """A parameter as PostgreSQL's text input of the type its cast names."""
    kind = type(value)
    if value is None:
        return None
    if kind is str:
        return value.encode()  # type: ignore[no-any-return]
    if kind is bool:
        return b"t" if value else b"f"
    if kind is int:
        return str(value).encode()
    if kind is float:
        if math.isfinite(value):
            return repr(value).encode()
        return b"NaN" if math.isnan(value) else b"Infinity" if value > 0 else b"-Infinity"
    if kind is datetime or kind is date:
        return value.isoformat().encode()  # type: ignore[no-any-return]
    raise _NotDirect(kind.__name__)


def _json_text(serialize: Callable[[Any], str], none_as_null: bool
               ) -> Callable[[Any], bytes | None]:
    """A JSON parameter as text, as SQLAlchemy's JSON type serializes it."""
    def text(value: Any) -> bytes | None:
        if value is None:
            return None if none_as_null else b"null"
        if not isinstance(value, dict | list | str | int | float):
            raise _NotDirect(type(value).__name__)
        return serialize(value).encode()
    return text


@dataclass(frozen=True)
class _Direct:
    """A statement as libpq runs it: `$n` parameters, each name once."""

    name: bytes
    sql: bytes
    names: tuple[str, ...]
    """The parameter of each `$n`, in order."""
    encoders: tuple[Callable[[Any], bytes | None], ...]
    fixed: dict[str, Any]
    """The values of the statement's own parameters and constant defaults, as given (not
    through their type's processor: the encoders write them)."""


def _direct(sql: str, order: tuple[str, ...],
            encoders: Mapping[str, Callable[[Any], bytes | None]],
            fixed: Mapping[str, Any]) -> _Direct:
    """`sql` (format paramstyle, `order` its parameters) as libpq takes it: `$n` parameters,
    a name used twice being one parameter, and `%%` back to `%`."""
    numbers: dict[str, int] = {}
    at = iter(order)

    def rewrite(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        name = next(at)
        return f"${numbers.setdefault(name, len(numbers) + 1)}"

    text = _POSITIONAL.sub(rewrite, sql)
    names = tuple(numbers)
    return _Direct(f"vf_fast_{next(_names)}".encode(), text.encode(), names,
                   tuple(encoders[n] for n in names), {n: fixed[n] for n in names if n in fixed})


class FastStatement:
    """One Core statement, compiled once per dialect, executed on the driver's connection.

    `keys`: the parameter names callers give (for an INSERT, the columns they set; the
    others that have a Python-side default get it, as Core would give it).
    """

    def __init__(self, statement: Executable, keys: Iterable[str] = (),
                 direct: bool = False) -> None:
        self.statement = statement
        self.keys = tuple(keys)
        self.direct = direct
        """PostgreSQL in autocommit: run on libpq (see the module's notes). Its rows then come
        back as text (bytes), for callers that only count them."""
        self._compiled: dict[str, _Compiled] = {}

    def _compile(self, dialect: Dialect) -> _Compiled:
        defaults: dict[str, Callable[[], Any]] = {}
        column_keys: list[str] | None = None
        if isinstance(self.statement, Insert) and self.statement.select is None:
            table = self.statement.table
            column_keys = list(self.keys)
            for col in table.columns:  # type: ignore[attr-defined]
                make = None if col.key in self.keys else column_default(col)
                if make is not None:
                    defaults[col.key] = make
                    column_keys.append(col.key)
        compiled = self.statement.compile(dialect=dialect, column_keys=column_keys)
        if compiled.escaped_bind_names:  # type: ignore[attr-defined]
            raise ValueError("FastStatement needs plain parameter names")
        order = tuple(compiled.positiontup) if compiled.positional else None  # type: ignore[attr-defined]
        names = set(order) if order is not None else \
            {n for n in _TOKENS.findall(compiled.string) if n}
        processors: dict[str, Callable[[Any], Any]] = {}
        literals: dict[str, Any] = {}
        sql = compiled.string
        inline: dict[str, str] = {}
        encoders: dict[str, Callable[[Any], bytes | None]] = {}
        fixed: dict[str, Any] = {}
        for name, bind in compiled.binds.items():  # type: ignore[attr-defined]
            if name not in names:
                continue  # an anonymous parameter's other key
            impl = bind.type.dialect_impl(dialect)
            if isinstance(impl, JSON):
                encoders[name] = _json_text(
                    getattr(dialect, "_json_serializer", None) or json.dumps, impl.none_as_null)
            elif impl.bind_processor(dialect) is None:
                encoders[name] = _text
            if not bind.required and order is None:
                text = _literal(impl, dialect, bind.effective_value)
                if text is not None:
                    # Written into the SQL once: the driver does not adapt it at each run.
                    # (The dialect's rendering already doubles % for the paramstyle.)
                    inline[name] = text
                    names.discard(name)
                    continue
            proc = impl.bind_processor(dialect)
            if proc is not None:
                processors[name] = proc
            if not bind.required:
                value = bind.effective_value
                literals[name] = proc(value) if proc is not None else value
                fixed[name] = value
        if order is None:
            # One pass over the SQL as compiled (never over literals already written in):
            # literals in, and on PostgreSQL the others positional (%s, values in a tuple),
            # which psycopg adapts for less than a mapping by name; a name used twice is
            # given twice.
            positional = dialect.name == "postgresql"
            positions: list[str] = []

            def rewrite(m: re.Match[str]) -> str:
                name = m.group(1)
                if name is None:
                    return m.group(0)  # an escaped %
                if name in inline:
                    return inline[name]
                if not positional:
                    return m.group(0)
                positions.append(name)
                return "%s"

            sql = _TOKENS.sub(rewrite, sql)
            if positional:
                order = tuple(positions)
        missing = names - set(literals) - set(self.keys) - set(defaults)
        if self.keys and missing:
            raise ValueError(f"FastStatement: no value for {sorted(missing)}")
        constants: dict[str, Any] = {}
        for key, make in list(defaults.items()):
            if is_constant(make):
                proc = processors.get(key)
                constants[key] = proc(make()) if proc is not None else make()
                fixed[key] = make()
                del defaults[key]
        direct = None
        if self.direct and dialect.name == "postgresql" and order is not None \
                and all(n in encoders for n in order):
            direct = _direct(sql, order, encoders, fixed)
        return _Compiled(sql, order, literals, processors, defaults, constants,
                         prepare=dialect.name == "postgresql", direct=direct)

    def compiled(self, dialect: Dialect) -> _Compiled:
        done = self._compiled.get(dialect.name)
        if done is None:
            done = self._compiled[dialect.name] = self._compile(dialect)
        return done

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Run with `params` in `conn`'s transaction (begun first if it is not); the
        driver's cursor."""
        dialect = conn.dialect
        c = self.compiled(dialect)
        if not conn.in_transaction():
            conn.begin()
        if c.direct is not None:
            driver = conn.connection.driver_connection
            if driver is not None and driver.autocommit and _utf8(conn):
                try:
                    return self._run_direct(conn, c.direct, c.defaults, params)
                except _NotDirect:
                    pass  # a value psycopg adapts: the usual way below
        values = dict(c.literals)  # processed already
        processors = c.processors
        for key, value in params.items():
            proc = processors.get(key)
            values[key] = value if proc is None else proc(value)
        for key, default in c.defaults.items():
            if key not in params:
                proc = processors.get(key)
                values[key] = default() if proc is None else proc(default())
        for key, value in c.constants.items():
            if key not in values:
                values[key] = value
        args: Any = tuple(values[k] for k in c.order) if c.order is not None else values
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            if c.prepare:
                info = conn.connection.info  # cleared when the connection is closed
                cursor = info.get(_CURSOR)
                if cursor is None or cursor.closed or cursor.connection is not driver:
                    cursor = info[_CURSOR] = driver.cursor()
                return cursor.execute(c.sql, args, prepare=True)
            return driver.execute(c.sql, args)
        except dialect.loaded_dbapi.Error as err:
            raise _as_sqlalchemy(conn, c.sql, args, err) from err

    @staticmethod
    def _run_direct(conn: Connection, d: _Direct, defaults: Mapping[str, Callable[[], Any]],
                    params: Mapping[str, Any]) -> _Rows:
        """Prepared once on this connection, run by libpq, parameters as text."""
        args = []
        for name, encode in zip(d.names, d.encoders, strict=True):
            if name in params:
                value = params[name]
            elif name in d.fixed:
                value = d.fixed[name]
            else:
                value = defaults[name]()
            args.append(encode(value))
        record = conn.connection
        pgconn = record.driver_connection.pgconn  # type: ignore[union-attr]
        prepared: set[bytes] = record.info.setdefault(_PREPARED, set())
        psycopg = conn.dialect.loaded_dbapi
        try:
            for attempt in (1, 2):
                if d.name not in prepared:
                    _check(psycopg, pgconn.prepare(d.name, d.sql))
                    prepared.add(d.name)
                result = pgconn.exec_prepared(d.name, args)
                if attempt == 1 and result.error_field(_SQLSTATE) == _NO_SUCH_STATEMENT:
                    prepared.discard(d.name)  # gone from the session (DISCARD ALL): again
                    continue
                _check(psycopg, result)
                return _Rows(result)
            raise AssertionError("unreachable: the second attempt returns or raises")
        except psycopg.Error as err:
            raise _as_sqlalchemy(conn, d.sql.decode(), args, err) from err


def _as_sqlalchemy(conn: Connection, sql: str, args: Any, err: Exception) -> exc.DBAPIError:
    """A driver error as SQLAlchemy's own (IntegrityError, ...), the connection invalidated
    first when the error says it is gone, as SQLAlchemy's execute does."""
    dialect = conn.dialect
    gone = dialect.is_disconnect(err, conn.connection.dbapi_connection, None)
    if gone:
        conn.invalidate(err)
    return exc.DBAPIError.instance(sql, args, err, dialect.loaded_dbapi.Error,
                                   connection_invalidated=gone, dialect=dialect)


def _utf8(conn: Connection) -> bool:
    """The connection's client encoding is UTF-8 (the direct path's text), looked up once."""
    info = conn.connection.info
    utf8 = info.get(_UTF8)
    if utf8 is None:
        utf8 = info[_UTF8] = conn.connection.driver_connection.info.encoding == "utf-8"  # type: ignore[union-attr]
    return bool(utf8)


_UTF8 = "virtfleet.fast.utf8"

_SQLSTATE = ord("C")  # PG_DIAG_SQLSTATE
_NO_SUCH_STATEMENT = b"26000"  # invalid_sql_statement_name


def _check(psycopg: Any, result: Any) -> None:
    """Raise psycopg's error for a result that is one."""
    if result.status not in _OK:
        raise psycopg.errors.error_from_result(result, encoding="utf-8")


_OK = (1, 2)  # COMMAND_OK, TUPLES_OK


class _Rows:
    """A direct statement's outcome: its row count, and its rows as text (bytes)."""

    def __init__(self, result: Any) -> None:
        self._result = result
        status = result.command_tuples
        self.rowcount = -1 if status is None else int(status)
        self._next = 0

    def fetchone(self) -> tuple[bytes | None, ...] | None:
        result = self._result
        if self._next >= result.ntuples:
            return None
        row = tuple(result.get_value(self._next, i) for i in range(result.nfields))
        self._next += 1
        return row
