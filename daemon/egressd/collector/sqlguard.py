"""Vet and translate user SQL (Databricks/Spark dialect) for the collector's DuckDB table.

    spark SQL --parse(spark)--> one read-only query? --rewrite--> DuckDB SQL --re-parse, re-check--> store

Accepted: a single SELECT (with CTEs, joins, subqueries, UNION...) over
``system.access.outbound_network`` (or ``outbound_network``) only. Refused: every other statement
(DDL, DML, ATTACH, COPY, PRAGMA, SET, ...), several statements, other tables, table functions,
and functions that read files, run SQL or reveal the server's settings.

Rewrites: the table name (``system`` is a built-in catalog in DuckDB), Spark's ``SORT BY`` and
``CLUSTER BY`` become ``ORDER BY`` (one node, one partition), ``DISTRIBUTE BY`` is dropped, and
the outermost query gets ``LIMIT max_rows``. The store runs the result read-only as well.
"""

from __future__ import annotations

import logging
import re

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel

from egressd.errors import ValidationError

#: Name of the real table in the DuckDB file.
REAL_TABLE = "outbound_network"
#: Names a user may write: system.access.outbound_network, or outbound_network alone.
_ALLOWED = {("system", "access", "outbound_network"), ("", "", "outbound_network")}

MAX_QUERY_CHARS = 100_000

# Statements and clauses that are never part of a read-only query.
_FORBIDDEN_NODES: tuple[type[exp.Expression], ...] = tuple(
    getattr(exp, name) for name in (
        "DDL", "DML", "Insert", "Update", "Delete", "Merge", "Create", "Drop", "Alter",
        "TruncateTable", "Command", "Copy", "Pragma", "Set", "SetItem", "Use", "Attach",
        "Detach", "Install", "Export", "LoadData", "Cache", "Uncache", "Refresh", "Describe",
        "Show", "Transaction", "Commit", "Rollback", "Into", "Lock", "Grant", "Revoke", "Kill",
        "Analyze", "Summarize",
    ) if hasattr(exp, name)
)

_FIRST_WORD = re.compile(r"\s*\(*\s*([A-Za-z_]+)")
_FORBIDDEN_STATEMENTS = {
    "DROP", "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "CREATE", "ALTER",
    "TRUNCATE", "ATTACH", "DETACH", "COPY", "PRAGMA", "SET", "RESET", "INSTALL", "LOAD",
    "EXPORT", "IMPORT", "CALL", "USE", "BEGIN", "START", "COMMIT", "ROLLBACK", "ABORT", "END",
    "CHECKPOINT", "FORCE", "VACUUM", "ANALYZE", "EXPLAIN", "DESCRIBE", "DESC", "SHOW",
    "SUMMARIZE", "GRANT", "REVOKE", "PREPARE", "EXECUTE", "DEALLOCATE", "CACHE", "UNCACHE",
    "REFRESH", "MSCK", "ADD", "LIST", "UNPIVOT", "PIVOT", "COMMENT",
}

# Functions (DuckDB names, lower case) that touch files, run SQL text, or reveal settings.
_FORBIDDEN_FUNCS = {
    "glob", "query", "query_table", "getenv", "current_setting", "checkpoint",
    "force_checkpoint", "sniff_csv", "json_execute_serialized_sql", "json_serialize_sql",
    "json_deserialize_sql", "which_secret", "load_aws_credentials", "install", "load",
    "enable_profiling", "disable_profiling", "enable_logging", "disable_logging", "read",
}
_FORBIDDEN_PREFIXES = (
    "read_", "parquet_", "iceberg_", "delta_", "duckdb_", "pragma_", "sqlite_", "postgres_",
    "mysql_", "http_", "s3_", "azure_", "gcs_", "ducklake_", "csv_", "json_execute",
)

logging.getLogger("sqlglot").setLevel(logging.ERROR)


def _refuse(message: str) -> ValidationError:
    return ValidationError(f"query: {message}")


def translate(spark_sql: str, max_rows: int) -> str:
    """Check ``spark_sql`` and return the equivalent DuckDB SQL, capped at ``max_rows`` rows.

    Raises ``ValidationError`` (and nothing else) when the query is refused or cannot be read.
    """
    if not isinstance(spark_sql, str) or not spark_sql.strip():
        raise _refuse("must be a non-empty string")
    if len(spark_sql) > MAX_QUERY_CHARS:
        raise _refuse(f"is longer than {MAX_QUERY_CHARS} characters")
    if max_rows < 1:
        raise ValueError("max_rows must be positive")
    word = _FIRST_WORD.match(spark_sql)
    if word and word.group(1).upper() in _FORBIDDEN_STATEMENTS:
        raise _refuse(f"{word.group(1).upper()} is not allowed: only a single read-only SELECT")
    try:
        return _translate(spark_sql, max_rows)
    except ValidationError:
        raise
    except RecursionError:
        raise _refuse("is nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - sqlglot raises assorted errors on odd trees
        raise _refuse(f"cannot be processed: {_short(exc)}") from None


def _translate(spark_sql: str, max_rows: int) -> str:
    tree = _parse_one(spark_sql, "spark")
    _check(tree, allowed=_ALLOWED)
    tree = _rewrite(tree, max_rows)
    try:
        out = tree.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
    except sqlglot.errors.SqlglotError as exc:
        raise _refuse(f"cannot be translated to DuckDB: {_short(exc)}") from None
    # Defense in depth: what reaches DuckDB must pass the same checks in DuckDB's dialect.
    _check(_parse_one(out, "duckdb"), allowed={("", "", REAL_TABLE)})
    return out


def _parse_one(sql: str, dialect: str) -> exp.Expression:
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except Exception as exc:  # noqa: BLE001 - ParseError, TokenError, RecursionError...
        raise _refuse(f"cannot be parsed: {_short(exc)}") from None
    if len(statements) != 1:
        raise _refuse(f"must be exactly one statement, got {len(statements)}")
    return statements[0]


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _check(tree: exp.Expression, *, allowed: set[tuple[str, str, str]]) -> None:
    if not isinstance(tree, exp.Query):
        raise _refuse(f"only a SELECT query is allowed, not {tree.key.upper()}")
    for node in tree.walk():
        if isinstance(node, _FORBIDDEN_NODES):
            raise _refuse(f"{node.key.upper()} is not allowed in a read-only query")
        if isinstance(node, exp.Table):
            _check_table(node, allowed)
        elif isinstance(node, exp.Func):
            name = _func_name(node)
            if name in _FORBIDDEN_FUNCS or name.startswith(_FORBIDDEN_PREFIXES):
                raise _refuse(f"function {name}() is not allowed")


def _func_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    return node.sql_name().lower()


def _check_table(node: exp.Table, allowed: set[tuple[str, str, str]]) -> None:
    if not isinstance(node.this, exp.Identifier):
        raise _refuse(f"table functions are not allowed: {node.this.sql()[:80]}")
    parts = (node.catalog.lower(), node.db.lower(), node.name.lower())
    if parts in allowed or (parts[:2] == ("", "") and _is_visible_cte(node, parts[2])):
        return
    shown = ".".join(p for p in parts if p)
    raise _refuse(f"unknown table {shown!r}: only system.access.outbound_network can be queried")


def _cte_names(with_: exp.With, upto: int | None = None) -> set[str]:
    return {cte.alias_or_name.lower() for cte in with_.expressions[:upto]}


def _is_visible_cte(table: exp.Table, name: str) -> bool:
    """Is ``name`` a CTE in scope at ``table``? A CTE body sees only the CTEs defined before
    it (itself too under WITH RECURSIVE); a query body sees all of its WITH's CTEs."""
    node: exp.Expression = table
    while node.parent is not None:
        parent = node.parent
        if isinstance(parent, exp.With) and isinstance(node, exp.CTE):
            idx = parent.expressions.index(node)
            upto = idx + 1 if parent.args.get("recursive") else idx
            if name in _cte_names(parent, upto):
                return True
            # Skip the query owning this WITH: its later CTEs are not visible here.
            owner = parent.parent
            if owner is None:
                return False
            node = owner
            continue
        with_ = parent.args.get("with_") or parent.args.get("with")
        if isinstance(with_, exp.With) and with_ is not node and name in _cte_names(with_):
            return True
        node = parent
    return False


def _rewrite(tree: exp.Expression, max_rows: int) -> exp.Expression:
    for table in list(tree.find_all(exp.Table)):
        if (table.catalog.lower(), table.db.lower(), table.name.lower()) in _ALLOWED:
            table.set("catalog", None)
            table.set("db", None)
            table.set("this", exp.to_identifier(REAL_TABLE))
    for column in tree.find_all(exp.Column):
        # system.access.outbound_network.event_id -> outbound_network.event_id
        if column.args.get("catalog") or column.args.get("db"):
            names = (column.catalog.lower(), column.db.lower(), column.table.lower())
            if names == ("system", "access", "outbound_network"):
                column.set("catalog", None)
                column.set("db", None)
    for select in list(tree.find_all(exp.Select)):
        _spark_ordering(select)
    return _cap(tree, max_rows)


def _spark_ordering(select: exp.Select) -> None:
    """One node is one partition: SORT BY and CLUSTER BY are ORDER BY; DISTRIBUTE BY is a no-op."""
    sort, cluster = select.args.get("sort"), select.args.get("cluster")
    if not select.args.get("order"):
        if sort is not None:
            select.set("order", exp.Order(expressions=list(sort.expressions)))
        elif cluster is not None:
            select.set("order", exp.Order(expressions=[
                e if isinstance(e, exp.Ordered) else exp.Ordered(this=e, nulls_first=True)
                for e in cluster.expressions
            ]))
    for key in ("sort", "cluster", "distribute"):
        select.set(key, None)


def _cap(tree: exp.Expression, max_rows: int) -> exp.Expression:
    """Make the outermost query return at most ``max_rows`` rows; returns the new root."""
    if not isinstance(tree, exp.Subquery):
        limit = tree.args.get("limit")
        if limit is None:
            tree.set("limit", exp.Limit(expression=exp.Literal.number(max_rows)))
            return tree
        value = limit.expression if isinstance(limit, exp.Limit) else None
        if isinstance(value, exp.Literal) and value.is_int:
            if int(value.to_py()) > max_rows:
                limit.set("expression", exp.Literal.number(max_rows))
            return tree
    # Anything unusual (LIMIT expression, FETCH, parenthesised query): wrap it.
    wrapped = exp.select("*").from_(
        exp.Subquery(this=tree, alias=exp.TableAlias(this=exp.to_identifier("_q"))))
    wrapped.set("limit", exp.Limit(expression=exp.Literal.number(max_rows)))
    return wrapped
