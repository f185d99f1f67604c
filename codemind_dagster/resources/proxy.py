"""Blue/green and canary proxy: forwards each new connection to a backend of a target file, by weight, with metrics."""

# Stdlib only and no imports from the package: the runtime starts this on every environment's
# first deploy (and after a reboot), so it has to be up in a few tens of milliseconds. The metric
# classes come from service_support.py next to this file, loaded by path (stdlib only as well).
#
# Bytes are forwarded as they arrive; the HTTP/1.x framing is only read alongside, to count and time
# each request per backend version. Anything the reader does not understand (an upgrade, a malformed
# message) ends the counting for that connection, never the forwarding.

import argparse
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import NamedTuple

_BUFFER = 65536
_CONNECT_TIMEOUT_S = 5.0
_MAX_HEAD = 65536  # a head longer than this is not read as HTTP (it is still forwarded)
_NO_ANSWER = "none"  # status label of a request whose connection closed before its answer
_ROUTE_CACHE = 4096  # distinct paths remembered


def _load_support():
    spec = importlib.util.spec_from_file_location("codemind_service_support", Path(__file__).with_name(
        "service_support.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


support = _load_support()


class Backend(NamedTuple):
    """Where a connection goes, and the version label its requests are counted under."""

    host: str
    port: int
    version: str = ""
    color: str = ""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class Weighted(NamedTuple):
    """A backend and its share of new connections (any non-negative numbers; 0: none)."""

    backend: Backend
    weight: int


class Picker:
    """Smooth weighted round robin: over any run of `sum(weights)` connections each backend gets exactly its weight."""

    def __init__(self, targets: tuple[Weighted, ...]) -> None:
        self.targets = targets
        self._live = [t for t in targets if t.weight > 0]
        self._total = sum(t.weight for t in self._live)
        self._current = [0] * len(self._live)

    def pick(self) -> Backend | None:
        # Deterministic rather than random, so a 10 % canary gets 10 of every 100 connections, not roughly that.
        if not self._live:
            return None
        best = 0
        for i, t in enumerate(self._live):
            self._current[i] += t.weight
            if self._current[i] > self._current[best]:
                best = i
        self._current[best] -= self._total
        return self._live[best].backend


class TargetFile:
    """The backends written in a file, one `host:port [version [color [weight]]]` per line, re-read on change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._picker = Picker(())

    def current(self) -> Picker:
        try:
            st = os.stat(self.path)
        except OSError:
            self._signature = None
            self._picker = Picker(())
            return self._picker
        # The runtime replaces the file (new inode), so two writes within one mtime tick still differ.
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._picker = Picker(read_target(self.path))
            self._signature = signature
        return self._picker


def read_target(path: str) -> tuple[Weighted, ...]:
    """The backends of a target file; a line without a weight weighs 100, an unreadable file or line means none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            words = line.split()
            if not words:
                continue
            host, _, port = words[0].rpartition(":")
            if not host:
                return ()
            weight = int(words[3]) if len(words) > 3 else 100
            if weight < 0:
                return ()
            out.append(Weighted(Backend(host, int(port), *words[1:3]), weight))
        return tuple(out)
    except (OSError, ValueError):
        # Half a file is worse than none: the runtime writes whole files, so this is someone's hand edit.
        return ()


# ---- metrics ----------------------------------------------------------------------------------


class ProxyMetrics:
    """What the proxy saw, per backend version: the services' own request metrics plus connections."""

    def __init__(self) -> None:
        self.requests = support.RequestMetrics(("version", "color", "method", "route"))
        self._lock = threading.Lock()
        self._connections: dict[tuple[str, str], int] = {}
        self._connect_errors: dict[tuple[str, str], int] = {}
        self._routes: set[str] = set()
        self._route_of: dict[str, str] = {}  # path -> label, so repeated paths skip the regex
        self.target: TargetFile | None = None

    def route(self, path: str) -> str:
        route = self._route_of.get(path)
        if route is not None:
            return route
        # The proxy knows no route table: ids in paths become {id}, and the label set stays bounded.
        route = support.path_template(path)
        if route not in self._routes:
            if len(self._routes) >= support.MAX_ROUTES:
                return "other"
            with self._lock:
                self._routes.add(route)
        if len(self._route_of) < _ROUTE_CACHE:
            self._route_of[path] = route
        return route

    def connection(self, backend: Backend, ok: bool) -> None:
        key = (backend.version, backend.color)
        with self._lock:
            counts = self._connections if ok else self._connect_errors
            counts[key] = counts.get(key, 0) + 1

    def render(self) -> bytes:
        lines = self.requests.render(("version", "color"))
        names = ("version", "color")
        with self._lock:
            connections = sorted(self._connections.items())
            errors = sorted(self._connect_errors.items())
        lines += ["# HELP codemind_proxy_connections_total Client connections forwarded to a backend.",
                  "# TYPE codemind_proxy_connections_total counter"]
        lines += [f"codemind_proxy_connections_total{support.labels(names, k)} {n}" for k, n in connections]
        lines += ["# HELP codemind_proxy_backend_connect_errors_total Client connections the backend refused.",
                  "# TYPE codemind_proxy_backend_connect_errors_total counter"]
        lines += [f"codemind_proxy_backend_connect_errors_total{support.labels(names, k)} {n}" for k, n in errors]
        targets = self.target.current().targets if self.target else ()
        lines += ["# HELP codemind_proxy_target_info The backends new connections go to.",
                  "# TYPE codemind_proxy_target_info gauge"]
        weights = ["# HELP codemind_proxy_target_weight Each backend's share of new connections, in percent.",
                   "# TYPE codemind_proxy_target_weight gauge"]
        total = sum(t.weight for t in targets)
        for backend, weight in targets:
            values = (backend.version, backend.color, f"{backend.host}:{backend.port}")
            label = support.labels((*names, "address"), values)
            lines.append(f"codemind_proxy_target_info{label} 1")
            weights.append(f"codemind_proxy_target_weight{label} {support.number(100 * weight / total if total else 0)}")
        lines += weights
        return support.exposition(lines + support.process_metrics())


METRICS = ProxyMetrics()


# ---- HTTP/1.x framing, read alongside the bytes ------------------------------------------------


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of a header in a lower-cased head that starts with CRLF, or None."""
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    end = head.find(b"\r\n", start)
    return head[start:end if end >= 0 else len(head)].strip()


class _Chunks:
    """Consumes a chunked body: size lines, data, CRLFs, and trailers up to the empty line."""

    __slots__ = ("left", "line", "state")

    def __init__(self) -> None:
        self.state, self.left, self.line = "size", 0, b""

    def feed(self, data: bytes, pos: int) -> tuple[int, bool]:
        n = len(data)
        while pos < n:
            if self.state == "data":
                take = min(self.left, n - pos)
                self.left -= take
                pos += take
                if self.left == 0:
                    self.state = "size"
                    self.line = b""
                    # The CRLF after the data reads as an empty size line, skipped below.
                    self.left = -1
                continue
            j = data.find(b"\n", pos)
            if j < 0:
                self.line += data[pos:]
                if len(self.line) > _MAX_HEAD:
                    raise ValueError("chunk line too long")
                return n, False
            line = (self.line + data[pos:j]).strip()
            self.line = b""
            pos = j + 1
            if self.state == "size":
                if not line and self.left == -1:
                    self.left = 0
                    continue
                size = int(line.split(b";", 1)[0], 16)
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.left = "data", size
            elif not line:  # the empty line that ends the trailers
                return pos, True
        return pos, False


class _Reader:
    """Reads one direction of a connection as a sequence of HTTP messages."""

    __slots__ = ("body_left", "chunks", "exchange", "head", "until_close")

    def __init__(self, exchange: "_Exchange") -> None:
        self.exchange = exchange
        self.head = b""
        self.body_left = 0
        self.chunks: _Chunks | None = None
        self.until_close = False

    def feed(self, data: bytes) -> None:
        if self.exchange.opaque or self.until_close:
            return
        try:
            self._feed(data)
        except (ValueError, IndexError, UnicodeDecodeError):
            self.exchange.opaque = True

    def _feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.exchange.opaque and not self.until_close:
            if self.body_left:
                take = min(self.body_left, n - pos)
                self.body_left -= take
                pos += take
                if self.body_left == 0:
                    self.message_done()
                continue
            if self.chunks is not None:
                pos, done = self.chunks.feed(data, pos)
                if done:
                    self.chunks = None
                    self.message_done()
                continue
            end = data.find(b"\r\n\r\n", pos) if not self.head else -1
            if end >= 0:  # the common case: the whole head arrived in this read
                head, pos = data[pos:end], end + 4
            else:
                buf = self.head + data[pos:]
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("head too long")
                    self.head = buf
                    return
                head, data, pos, n = buf[:end], buf[end + 4:], 0, len(buf) - end - 4
                self.head = b""
            self.on_head(head)

    def framing(self, head: bytes, bodiless: bool) -> bool:
        """Set up the body of a message from its head; True when the message has no body at all."""
        if bodiless:
            return True
        lower = head.lower()
        encoding = _header(lower, b"transfer-encoding")
        if encoding is not None and b"chunked" in encoding:
            self.chunks = _Chunks()
            return False
        length = _header(lower, b"content-length")
        if length is not None:
            self.body_left = int(length)
            if self.body_left < 0:
                raise ValueError("negative content-length")
            return self.body_left == 0
        return None  # type: ignore[return-value]  # neither: the caller decides (request: none, response: close)

    def on_head(self, head: bytes) -> None:
        raise NotImplementedError

    def message_done(self) -> None:
        pass


class _RequestReader(_Reader):
    __slots__ = ()

    def on_head(self, head: bytes) -> None:
        line_end = head.find(b"\r\n")
        first = head if line_end < 0 else head[:line_end]
        method, target, _ = first.split(b" ", 2)
        if not method.isalpha():
            raise ValueError("not an HTTP request")
        path = target.split(b"?", 1)[0].decode("latin-1")
        self.exchange.request(method.decode("ascii"), path)
        self.framing(head[line_end:] if line_end >= 0 else b"", False)


class _ResponseReader(_Reader):
    __slots__ = ()

    def on_head(self, head: bytes) -> None:
        if not head.startswith(b"HTTP/1."):
            raise ValueError("not an HTTP response")
        status = int(head[9:12])
        if 100 <= status < 200 and status != 101:
            return  # informational (100 Continue): the real answer follows
        exchange = self.exchange
        exchange.status = status
        if status == 101:  # the connection becomes something else (WebSocket, h2c): stop reading it
            exchange.answered()
            exchange.opaque = True
            return
        method = exchange.pending[0][0] if exchange.pending else ""
        line_end = head.find(b"\r\n")
        rest = head[line_end:] if line_end >= 0 else b""
        done = self.framing(rest, method == "HEAD" or status in (204, 304))
        if done is None:
            self.until_close = True  # the body ends when the backend closes the connection
        elif done:
            exchange.answered()

    def message_done(self) -> None:
        self.exchange.answered()


class _Exchange:
    """One client connection: its requests in order, matched with the answers that come back."""

    __slots__ = ("backend", "opaque", "pending", "requests", "responses", "status")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.pending: deque[tuple[str, str, float]] = deque()
        self.opaque = False
        self.status = 0
        self.requests = _RequestReader(self)
        self.responses = _ResponseReader(self)

    def request(self, method: str, path: str) -> None:
        self.pending.append((method, METRICS.route(path), time.perf_counter()))
        METRICS.requests.started((self.backend.version, self.backend.color))

    def answered(self, status: str | None = None) -> None:
        if not self.pending:
            return
        method, route, started = self.pending.popleft()
        b = self.backend
        METRICS.requests.observe((b.version, b.color, method, route), status or str(self.status),
                                 time.perf_counter() - started, group=(b.version, b.color))

    def closed(self) -> None:
        """Both directions are done: settle an answer that ran to the close, and requests never answered."""
        if self.responses.until_close and not self.opaque:
            self.answered()
        b = self.backend
        while self.pending:
            method, route, _ = self.pending.popleft()
            if self.opaque:
                METRICS.requests.finished((b.version, b.color))
            else:
                METRICS.requests.observe((b.version, b.color, method, route), _NO_ANSWER, None,
                                         group=(b.version, b.color))


# ---- forwarding -------------------------------------------------------------------------------


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _pump(src: socket.socket, dst: socket.socket, finished, before=None, after=None) -> None:
    try:
        while data := src.recv(_BUFFER):
            # Requests are noted before they reach the backend, answers after they reached the client,
            # so the latency covers what the client waits for and reading never delays a byte.
            if before is not None:
                before(data)
            dst.sendall(data)
            if after is not None:
                after(data)
        # Pass the half-close on so the peer sees end-of-request/response as it would directly.
        _shutdown(dst, socket.SHUT_WR)
    except OSError:
        # A reset on either side ends the whole connection; this also wakes the other pump.
        _shutdown(src, socket.SHUT_RDWR)
        _shutdown(dst, socket.SHUT_RDWR)
    finally:
        finished()


def _serve(client: socket.socket, target: Backend) -> None:
    try:
        backend = socket.create_connection(target.address, timeout=_CONNECT_TIMEOUT_S)
    except OSError:
        METRICS.connection(target, ok=False)
        client.close()
        return
    METRICS.connection(target, ok=True)
    backend.settimeout(None)
    for sock in (client, backend):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    exchange = _Exchange(target)
    remaining = [2]
    lock = threading.Lock()

    def finished() -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            client.close()
            backend.close()
            exchange.closed()

    # One thread per direction: a single thread blocked in sendall could deadlock a full-duplex peer.
    threading.Thread(target=_pump, args=(backend, client, finished, None, exchange.responses.feed),
                     daemon=True).start()
    _pump(client, backend, finished, exchange.requests.feed, None)


def serve_forever(listener: socket.socket, target: TargetFile) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            # Out of file descriptors and the like: back off instead of spinning.
            print(f"proxy: accept failed: {exc}", file=sys.stderr)
            time.sleep(0.1)
            continue
        # Read after accept, so a connection made after the target was replaced reaches the new backend.
        backend = target.current().pick()
        if backend is None:
            client.close()
            continue
        threading.Thread(target=_serve, args=(client, backend), daemon=True).start()


# ---- the metrics endpoint ---------------------------------------------------------------------


def _answer(client: socket.socket) -> None:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
        chunk = client.recv(4096)
        if not chunk:
            return
        head += chunk
    method, _, rest = head.partition(b" ")
    path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    if path != support.METRICS_PATH.encode():
        status, ctype, body = "404 Not Found", "application/json", b'{"detail": "only GET /metrics is served here"}'
    elif method not in (b"GET", b"HEAD"):
        status, ctype, body = "405 Method Not Allowed", "application/json", b'{"detail": "only GET is allowed"}'
    else:
        status, ctype, body = "200 OK", support.CONTENT_TYPE, METRICS.render()
    head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
    client.sendall(head_out + (b"" if method == b"HEAD" else body))


def serve_metrics(listener: socket.socket) -> None:
    """GET /metrics on a port of its own, so the environment's URL keeps serving only the service."""
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            time.sleep(0.1)
            continue
        with client:
            client.settimeout(5.0)  # one scrape at a time; a silent client must not hold the others up
            try:
                _answer(client)
            except OSError:
                pass


def _listener(fd: int | None, listen: str | None) -> socket.socket:
    if fd is not None:
        # Inherited from the runtime, which bound it so the port can't be taken in between.
        return socket.socket(fileno=fd)
    host, _, port = listen.rpartition(":")
    return socket.create_server((host or "127.0.0.1", int(port)), backlog=128)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codemind-proxy", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="inherited listening socket")
    where.add_argument("--listen", help="HOST:PORT to bind")
    metrics = parser.add_mutually_exclusive_group()
    metrics.add_argument("--metrics-fd", type=int, help="inherited listening socket for GET /metrics")
    metrics.add_argument("--metrics-listen", help="HOST:PORT to serve GET /metrics on")
    parser.add_argument("--target-file", required=True,
                        help="file holding the backends, one HOST:PORT [VERSION [COLOR [WEIGHT]]] per line")
    args = parser.parse_args(argv)
    # The runtime stops the proxy with SIGTERM; an ignore inherited from whoever started us must not outlive that.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    listener = _listener(args.fd, args.listen)
    host, port = listener.getsockname()[:2]
    target = TargetFile(args.target_file)
    METRICS.target = target
    where_metrics = ""
    if args.metrics_fd is not None or args.metrics_listen:
        metrics_listener = _listener(args.metrics_fd, args.metrics_listen)
        mhost, mport = metrics_listener.getsockname()[:2]
        where_metrics = f", metrics on {mhost}:{mport}"
        threading.Thread(target=serve_metrics, args=(metrics_listener,), daemon=True).start()
    print(f"proxy {os.getpid()}: listening on {host}:{port}, target from {args.target_file}{where_metrics}",
          file=sys.stderr)
    try:
        serve_forever(listener, target)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
