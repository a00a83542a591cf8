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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Insert, String, exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

_TOKENS = re.compile(r"%%|%\((\w+)\)s")
"""A parameter in the pyformat paramstyle (psycopg), or an escaped % (group 1 empty)."""

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


class FastStatement:
    """One Core statement, compiled once per dialect, executed on the driver's connection.

    `keys`: the parameter names callers give (for an INSERT, the columns they set; the
    others that have a Python-side default get it, as Core would give it).
    """

    def __init__(self, statement: Executable, keys: Iterable[str] = ()) -> None:
        self.statement = statement
        self.keys = tuple(keys)
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
        for name, bind in compiled.binds.items():  # type: ignore[attr-defined]
            if name not in names:
                continue  # an anonymous parameter's other key
            impl = bind.type.dialect_impl(dialect)
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
                del defaults[key]
        return _Compiled(sql, order, literals, processors, defaults, constants,
                         prepare=dialect.name == "postgresql")

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
            gone = dialect.is_disconnect(err, conn.connection.dbapi_connection, None)
            if gone:
                conn.invalidate(err)
            raise exc.DBAPIError.instance(c.sql, args, err, dialect.loaded_dbapi.Error,
                                          connection_invalidated=gone,
                                          dialect=dialect) from err
