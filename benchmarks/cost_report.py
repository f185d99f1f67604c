"""Cost-report benchmark: the daily FOCUS report over 1M ledger rows by SQL aggregation vs a pandas baseline.

Usage: .venv/bin/python benchmarks/cost_report.py [--rows 1000000] [--repeat 3] [--pg-url URL] [--no-postgres]

Every row is on the reported day, the worst case for the SQL side (no rows pruned by the index on `at`).
Both sides produce the same FOCUS CSV: SQL = GROUP BY in the database, then FOCUS mapping of the groups;
pandas = read the day's rows into a DataFrame, groupby there, then the same mapping. Times are medians of
--repeat runs; the table gives each database's speed-up over pandas reading that same database, and RESULT's
pandas_s is the faster of the two pandas runs (the strongest baseline). Temporary SQLite files and the
PostgreSQL database are created here and removed at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

from codemind_dagster.assets import finops
from codemind_dagster.domain import focus
from codemind_dagster.resources.database import _ENGINES, PlatformDB

DAY = date(2026, 11, 3)
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
COLUMNS = ("at", "run_id", "intent", "task", "provider", "model", "input_tokens", "cache_write_tokens",
           "cache_read_tokens", "output_tokens", "reasoning_tokens", "cost_usd", "price_version", "latency_ms",
           "outcome", "cache_hit")
INTENTS = [f"intent-{i:02d}" for i in range(40)] + [None]
TASKS = ["intent_analysis", "planning", "coding", "test_writing", "repair"]
MODELS = [("anthropic", "claude-sonnet-4"), ("anthropic", "claude-haiku-4"), ("openai", "gpt-5"),
          ("bedrock", "anthropic.claude-sonnet-4"), ("offline", "deterministic")]


def generate(n: int, seed: int = 1) -> list[tuple]:
    """Ledger rows in time order over the day; timestamps as text in each database's own format later."""
    rnd = random.Random(seed)
    start = datetime(DAY.year, DAY.month, DAY.day, tzinfo=UTC)
    step = 86_400_000_000 // n
    rows = []
    for i in range(n):
        provider, model = MODELS[rnd.randrange(len(MODELS))]
        rows.append((start + timedelta(microseconds=i * step), f"run-{i % 997}", INTENTS[rnd.randrange(len(INTENTS))],
                     TASKS[rnd.randrange(5)], provider, model, rnd.randrange(4000), rnd.randrange(400),
                     rnd.randrange(2000), rnd.randrange(2500), rnd.randrange(600),
                     f"{rnd.randrange(40_000) / 1_000_000:.6f}", "2026-11-01", 250.0,
                     "ok" if i % 50 else "error", i % 13 == 0))
    return rows


def load_sqlite(url: str, path: Path, rows: list[tuple]) -> None:
    PlatformDB(url).migrate()
    con = sqlite3.connect(path)
    fmt = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's storage format for DateTime on SQLite
    con.executemany(f"INSERT INTO llm_ledger ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                    ((r[0].strftime(fmt), *r[1:11], float(r[11]), *r[12:15], int(r[15])) for r in rows))
    con.commit()
    con.execute("ANALYZE")
    con.close()


def load_postgres(url: str, rows: list[tuple]) -> None:
    PlatformDB(url).migrate()
    buf = io.StringIO()
    for r in rows:
        buf.write("\t".join("\\N" if v is None else (r[0].isoformat() if v is r[0] else str(v)) for v in r) + "\n")
    buf.seek(0)
    loader = sa.create_engine(url)
    raw = loader.raw_connection()
    try:
        with raw.cursor() as cur:
            cur.copy_expert(f"COPY llm_ledger ({', '.join(COLUMNS)}) FROM STDIN", buf)
        raw.commit()
    finally:
        raw.close()
        loader.dispose()
    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")  # VACUUM refuses to run in a transaction
    with eng.connect() as c:
        c.execute(sa.text("VACUUM ANALYZE llm_ledger"))
    eng.dispose()


def sql_report(db: PlatformDB, out: Path) -> tuple[int, Decimal]:
    groups = finops.aggregate_day(db, DAY)
    rows = finops.report_rows(groups, DAY)
    finops.budget_vs_actual(db, DAY, groups, 50.0)
    finops.write_csv_atomic(out, focus.COLUMNS, rows)
    return len(rows), focus.total_billed(rows)


def pandas_report(db: PlatformDB, out: Path) -> tuple[int, Decimal]:
    import pandas as pd

    start, end = focus.day_bounds(DAY)
    led = finops.t.llm_ledger.c
    q = sa.select(*(led[c] for c in (*finops.GROUP_KEYS, *focus.TOKEN_COLUMNS, "cost_usd", "cache_hit",
                                     "outcome"))).where(led.at >= start, led.at < end)
    with db.engine.connect() as c:
        df = pd.read_sql(q, c)
    df["cost_usd"] = df["cost_usd"].astype(float)
    df["cache_hit"] = df["cache_hit"].astype(int)
    df["errors"] = (df["outcome"] != "ok").astype(int)
    agg = df.groupby(list(finops.GROUP_KEYS), dropna=False, sort=True).agg(
        calls=("cost_usd", "size"), cache_hits=("cache_hit", "sum"), errors=("errors", "sum"),
        **{c: (c, "sum") for c in focus.TOKEN_COLUMNS}, cost_usd=("cost_usd", "sum"),
        min_cost_usd=("cost_usd", "min")).reset_index()
    groups = [{**g, "intent": None if pd.isna(g["intent"]) else g["intent"],
               "cost_usd": Decimal(repr(round(g["cost_usd"], 8)))} for g in agg.to_dict("records")]
    rows = finops.report_rows(groups, DAY)
    finops.budget_vs_actual(db, DAY, groups, 50.0)
    finops.write_csv_atomic(out, focus.COLUMNS, rows)
    return len(rows), focus.total_billed(rows)


def timed(fn: Callable[[], tuple[int, Decimal]], repeat: int) -> tuple[float, tuple[int, Decimal]]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--pg-url", default=PG_URL, help="admin URL of a PostgreSQL server (a scratch database "
                                                     "is created and dropped)")
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    rows = generate(args.rows)
    print(f"generated {args.rows:,} ledger rows on {DAY} in {time.perf_counter() - t0:.1f}s", flush=True)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="codemind-bench-") as tmp:
        tmpdir = Path(tmp)
        url = f"sqlite:///{tmpdir / 'ledger.db'}"
        t0 = time.perf_counter()
        load_sqlite(url, tmpdir / "ledger.db", rows)
        print(f"loaded SQLite in {time.perf_counter() - t0:.1f}s", flush=True)
        results["sqlite"] = measure(PlatformDB(url), tmpdir, "sqlite", args.repeat)
        _ENGINES.pop(url).dispose()

        if not args.no_postgres:
            admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            name = f"codemind_bench_{uuid.uuid4().hex[:10]}"
            pg_url = args.pg_url.rsplit("/", 1)[0] + f"/{name}"
            with admin.connect() as c:
                c.execute(sa.text(f'CREATE DATABASE "{name}"'))
            try:
                t0 = time.perf_counter()
                load_postgres(pg_url, rows)
                print(f"loaded PostgreSQL in {time.perf_counter() - t0:.1f}s", flush=True)
                results["postgres"] = measure(PlatformDB(pg_url), tmpdir, "postgres", args.repeat)
            finally:
                if pg_url in _ENGINES:
                    _ENGINES.pop(pg_url).dispose()
                with admin.connect() as c:
                    c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()

    print()
    # Both sides are CPU-bound: other work on the machine moves the numbers, so say how busy it was.
    print(f"cpus={os.cpu_count()} load_average_1m={os.getloadavg()[0]:.2f}")
    print(f"{'database':<10} {'SQL report s':>13} {'pandas s':>10} {'speed-up':>9}")
    for db_name, r in results.items():
        print(f"{db_name:<10} {r['sql']:>13.3f} {r['pandas']:>10.3f} {r['pandas'] / r['sql']:>8.1f}x")
    pandas_s = min(r["pandas"] for r in results.values())  # the faster baseline: the conservative comparison
    pg = results.get("postgres", {}).get("sql", float("nan"))
    print(f"RESULT sqlite_s={results['sqlite']['sql']:.3f} postgres_s={pg:.3f} pandas_s={pandas_s:.3f}")
    return 0


def measure(db: PlatformDB, tmpdir: Path, label: str, repeat: int) -> dict[str, float]:
    sql_s, (sql_rows, sql_total) = timed(lambda: sql_report(db, tmpdir / f"{label}-sql.csv"), repeat)
    pd_s, (pd_rows, pd_total) = timed(lambda: pandas_report(db, tmpdir / f"{label}-pandas.csv"), repeat)
    # Same report both ways, or the comparison means nothing.
    assert sql_rows == pd_rows, (sql_rows, pd_rows)
    assert abs(sql_total - pd_total) < Decimal("0.0001"), (sql_total, pd_total)
    print(f"{label}: SQL {sql_s:.3f}s, pandas {pd_s:.3f}s ({sql_rows} FOCUS rows, ${sql_total:.2f})", flush=True)
    return {"sql": sql_s, "pandas": pd_s}


if __name__ == "__main__":
    sys.exit(main())
