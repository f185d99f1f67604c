"""The staging load test: a bounded, mixed workload over a service's own HTTP contract, derived from its intent."""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from codemind_dagster.domain.intent import EntitySpec, FieldSpec, Intent
from codemind_dagster.domain.loadtest import LoadTestResult, Sample, summarize

# Share of each operation in the mix, among those an entity offers (reads dominate, as in most services).
MIX = {"create": 2, "read": 4, "list": 2, "update": 2}
SEED_PER_ENTITY = 2
LIST_LIMIT = 20


def is_valid(f: FieldSpec, value: Any) -> bool:
    """check_value's verdict, plus JSON's own limits (no NaN or infinities)."""
    from codemind_dagster.agents.offline.service_samples import is_valid as valid

    return valid(f, value)


def field_value(f: FieldSpec, n: int, nonce: int) -> Any:
    """A valid value of a non-ref field; distinct for distinct n where the field is unique; None if none fits.

    `nonce` differs per load test, so unique values rarely meet those of an earlier test on the same data.
    """
    from codemind_dagster.agents.offline.service_samples import shaped

    key = nonce * 1_000_000 + n
    t = f.type
    candidates: list[Any] = []
    if t in ("string", "text"):
        if f.enum is not None:
            if not f.unique:
                candidates = [f.enum[n % len(f.enum)]]
            elif n < len(f.enum):  # a unique enum holds one object per member, then runs out
                candidates = [f.enum[n]]
        elif f.format == "uuid":
            candidates = [str(uuid.UUID(int=(nonce << 64) | n, version=4))]
        else:
            candidates = [shaped(f, key), shaped(f, n)]
    elif t == "integer":
        lo, hi = f.minimum, f.maximum
        if f.unique:
            candidates = [lo + key if lo is not None else None, hi - key if hi is not None else None,
                          lo + n if lo is not None else None, hi - n if hi is not None else None,
                          key + 1 if lo is None and hi is None else None]
        else:
            # Small non-negative numbers where allowed: free-text rules (balances, stock) rarely mind them.
            base = max(0, lo) if lo is not None else 0
            base = min(base, hi) if hi is not None else base
            candidates = [base + n % 10, base]
    elif t == "number":
        lo, hi = f.minimum, f.maximum
        if lo is not None and hi is not None:
            frac = ((key * 2_654_435_761) % 1_000_003) / 1_000_003 if f.unique else (n % 10) / 10
            candidates = [lo + (hi - lo) * frac, lo]
        elif lo is not None:
            candidates = [lo + (key if f.unique else n % 10) + 0.5]
        elif hi is not None:
            candidates = [hi - (key if f.unique else n % 10) - 0.5]
        else:
            candidates = [(key if f.unique else n % 10) + 0.5]
    elif t == "boolean":
        candidates = [(True, False)[n]] if f.unique and n < 2 else [] if f.unique else [n % 2 == 0]
    elif t == "datetime":
        moment = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=key if f.unique else n)
        candidates = [moment.strftime("%Y-%m-%dT%H:%M:%SZ")]
    for v in candidates:
        if v is not None and is_valid(f, v):
            return v
    return None


@dataclass
class EntityLoad:
    """One entity's part of the workload: what it offers, the ids it holds, how to make a body for it."""

    spec: EntitySpec
    path: str
    creatable: bool
    ids: list[int] = field(default_factory=list)
    counter: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_n(self) -> int:
        with self.lock:
            n, self.counter = self.counter, self.counter + 1
            return n

    def add(self, oid: int) -> None:
        with self.lock:
            self.ids.append(oid)

    def pick(self, rng: random.Random) -> int | None:
        with self.lock:
            return rng.choice(self.ids) if self.ids else None

    @property
    def unique(self) -> bool:
        return any(f.unique for f in self.spec.fields)

    def operations(self) -> list[str]:
        """What this entity adds to the mix: reads and updates only of objects the test itself created."""
        ops = self.spec.operations
        out = ["list"] if "list" in ops else []
        if self.creatable:
            out += [op for op in ("create", "read") if op in ops]
            if "update" in ops and self.patch_fields():
                out.append("update")
        return out

    def patch_fields(self) -> list[FieldSpec]:
        return [f for f in self.spec.fields if f.type != "ref"]


class Workload:
    """Create, read, list and update requests over an intent's entities, valid by the intent's own rules."""

    def __init__(self, intent: Intent, *, nonce: int | None = None):
        self.intent = intent
        self.nonce = random.randrange(1, 10_000) if nonce is None else nonce
        self.entities = {e.name: EntityLoad(e, "/" + e.collection, False) for e in intent.spec.entities}
        self.order = self._creation_order()
        for name in self.order:
            self.entities[name].creatable = True

    def _creation_order(self) -> list[str]:
        """Entities that can be created, parents before children (a required ref needs its target first)."""
        order: list[str] = []
        pending = [e for e in self.intent.spec.entities if "create" in e.operations]
        while True:
            ready = [e for e in pending
                     if all(f.to in order for f in e.fields if f.type == "ref" and f.required)]
            if not ready:
                return order  # the rest wait on a required self-reference, a cycle or an entity without create
            for e in ready:
                order.append(e.name)
                pending.remove(e)

    def create_body(self, load: EntityLoad, rng: random.Random) -> dict[str, Any] | None:
        """A full valid create body, or None when a required value is exhausted (a small unique enum, say)."""
        n = load.next_n()
        body: dict[str, Any] = {}
        for f in load.spec.fields:
            if f.type == "ref":
                if f.required:
                    parent = self.entities[f.to].pick(rng)
                    if parent is None:
                        return None
                    body[f.name] = parent
                continue
            v = field_value(f, n, self.nonce)
            if v is None and f.required and f.default is None:
                return None
            if v is not None:
                body[f.name] = v
        return body

    def patch_body(self, load: EntityLoad, rng: random.Random) -> dict[str, Any] | None:
        """A one-field partial update with a fresh valid value."""
        f = rng.choice(load.patch_fields())
        v = field_value(f, load.next_n(), self.nonce)
        return None if v is None else {f.name: v}


def run_load_test(base_url: str, intent: Intent, *, duration_s: float, concurrency: int,
                  timeout_s: float = 10.0, seed: int | None = None) -> LoadTestResult:
    """Drive the mixed workload at `base_url` for `duration_s` with `concurrency` workers; every request counts."""
    import httpx

    if not duration_s > 0:
        raise ValueError(f"load test duration must be positive, got {duration_s!r} s")
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"load test concurrency must be a positive integer, got {concurrency!r}")
    rng = random.Random(seed)
    work = Workload(intent, nonce=rng.randrange(1, 10_000))
    samples: list[Sample] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        # trust_env=False: a proxy from the environment must not stand between us and the service measured.
        return httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, trust_env=False)

    def record(s: Sample | None) -> None:
        if s is not None:
            with lock:
                samples.append(s)

    started = time.monotonic()
    with client() as c:
        for name in work.order:  # a few objects of each entity, parents first, so reads and refs have targets
            for _ in range(SEED_PER_ENTITY):
                record(_do(c, work, work.entities[name], "create", rng))
    deadline = time.monotonic() + duration_s

    def worker(i: int) -> None:
        wrng = random.Random(rng.random() + i)
        choices = [(load, op) for load in work.entities.values() for op in load.operations()]
        weights = [MIX[op] for _, op in choices]
        if not choices:
            return
        with client() as c:
            while time.monotonic() < deadline:
                load, op = wrng.choices(choices, weights)[0]
                s = _do(c, work, load, op, wrng)
                if s is None:
                    time.sleep(0.001)  # nothing to send for this pick; do not spin
                record(s)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadtest") as pool:
        for f in [pool.submit(worker, i) for i in range(concurrency)]:
            f.result()
    return summarize(samples, duration_s=time.monotonic() - started, concurrency=concurrency)


def _do(c, work: Workload, load: EntityLoad, op: str, rng: random.Random) -> Sample | None:
    """One request and whether the contract's answer came back (None: nothing to send); latency is the round trip."""
    import httpx

    name, ops = load.spec.name, load.spec.operations
    oid = load.pick(rng) if op in ("read", "update") else None
    if op in ("read", "update") and oid is None:
        op = "create"  # nothing of ours to read yet: make one first
    body = None
    if op == "create":
        body = work.create_body(load, rng)
        if body is None:  # a required unique value is exhausted: the entity can still be listed
            if "list" not in ops:
                return None
            op = "list"
    elif op == "update":
        body = work.patch_body(load, rng)
    params = None
    if op == "list":
        method, url, expected = "GET", load.path, {200}
        params = {"limit": LIST_LIMIT}
    elif op == "create":
        method, url, expected = "POST", load.path, {201}
    elif op == "read" or body is None:
        op, method, url, expected = "read", "GET", f"{load.path}/{oid}", {200}
    else:
        method, url, expected = "PATCH", f"{load.path}/{oid}", {200}
    if method in ("POST", "PATCH") and load.unique:
        expected = expected | {409}  # a unique value an earlier test's data holds: the contract's answer
    t0 = time.perf_counter()
    try:
        r = c.request(method, url, json=body, params=params)
    except httpx.HTTPError as e:
        return Sample(op, name, (time.perf_counter() - t0) * 1000, False, None, f"{type(e).__name__}: {e}"[:200])
    ms = (time.perf_counter() - t0) * 1000
    ok = r.status_code in expected
    if ok and r.status_code == 201:
        try:
            load.add(int(r.json()["id"]))
        except (ValueError, KeyError, TypeError):
            return Sample(op, name, ms, False, r.status_code, f"{method} {url} -> 201 without an integer id")
    err = None if ok else f"{method} {url} -> {r.status_code}: {r.text[:120]}"
    return Sample(op, name, ms, ok, r.status_code, err)
