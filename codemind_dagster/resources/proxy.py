"""Blue/green TCP proxy: forwards each new connection to the backend named in a target file."""

# Stdlib only and no imports from the package: the runtime starts this on every environment's
# first deploy (and after a reboot), so it has to be up in a few tens of milliseconds.

import argparse
import os
import socket
import sys
import threading
import time

_BUFFER = 65536
_CONNECT_TIMEOUT_S = 5.0


class TargetFile:
    """The backend address written in a file as `host:port`, re-read only when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._address: tuple[str, int] | None = None

    def current(self) -> tuple[str, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._signature = self._address = None
            return None
        # The runtime replaces the file (new inode), so two writes within one mtime tick still differ.
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature != self._signature:
            self._address = read_target(self.path)
            self._signature = signature
        return self._address


def read_target(path: str) -> tuple[str, int] | None:
    try:
        with open(path, encoding="ascii") as f:
            host, _, port = f.read().strip().rpartition(":")
        return (host, int(port)) if host else None
    except (OSError, ValueError):
        return None


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _pump(src: socket.socket, dst: socket.socket, finished) -> None:
    try:
        while data := src.recv(_BUFFER):
            dst.sendall(data)
        # Pass the half-close on so the peer sees end-of-request/response as it would directly.
        _shutdown(dst, socket.SHUT_WR)
    except OSError:
        # A reset on either side ends the whole connection; this also wakes the other pump.
        _shutdown(src, socket.SHUT_RDWR)
        _shutdown(dst, socket.SHUT_RDWR)
    finally:
        finished()


def _serve(client: socket.socket, address: tuple[str, int]) -> None:
    try:
        backend = socket.create_connection(address, timeout=_CONNECT_TIMEOUT_S)
    except OSError:
        client.close()
        return
    backend.settimeout(None)
    for sock in (client, backend):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    remaining = [2]
    lock = threading.Lock()

    def finished() -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            client.close()
            backend.close()

    # One thread per direction: a single thread blocked in sendall could deadlock a full-duplex peer.
    threading.Thread(target=_pump, args=(backend, client, finished), daemon=True).start()
    _pump(client, backend, finished)


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
        address = target.current()
        if address is None:
            client.close()
            continue
        threading.Thread(target=_serve, args=(client, address), daemon=True).start()


def _listener(args: argparse.Namespace) -> socket.socket:
    if args.fd is not None:
        # Inherited from the runtime, which bound it so the port can't be taken in between.
        return socket.socket(fileno=args.fd)
    host, _, port = args.listen.rpartition(":")
    return socket.create_server((host or "127.0.0.1", int(port)), backlog=128)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="codemind-proxy", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="inherited listening socket")
    where.add_argument("--listen", help="HOST:PORT to bind")
    parser.add_argument("--target-file", required=True, help="file holding the backend as HOST:PORT")
    args = parser.parse_args(argv)
    listener = _listener(args)
    host, port = listener.getsockname()[:2]
    print(f"proxy {os.getpid()}: listening on {host}:{port}, target from {args.target_file}", file=sys.stderr)
    try:
        serve_forever(listener, TargetFile(args.target_file))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
