"""Subprocess sandbox for generated code: time limit, memory cap, scrubbed environment, group kill."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TAIL_CHARS = 20_000
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# A death by one of these signals is blamed on the memory cap only with evidence (see _memory_evidence).
MEMORY_SIGNALS = {signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS}
MEMORY_TEXT_RE = re.compile(
    r"^(E\s+)?([\w.]+\.)?MemoryError\b|Cannot allocate memory|std::bad_alloc|^fatal: Out of memory",
    re.MULTILINE,
)
POLL_S = 0.05


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed command; `reason` explains a kill in one sentence."""

    returncode: int | None
    timed_out: bool
    memory_exceeded: bool
    duration_s: float
    stdout: str
    stderr: str
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.memory_exceeded


class SubprocessSandbox:
    """Runs commands in a directory under `root` with a time limit, an address-space cap and a clean env."""

    def __init__(self, root: Path, timeout_s: float = 120, memory_mb: int = 2048, *, grace_s: float = 2.0):
        if timeout_s <= 0 or memory_mb <= 0:
            raise ValueError("timeout_s and memory_mb must be positive")
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.grace_s = grace_s

    def run(
        self,
        cmd: list[str],
        *,
        workdir: Path,
        env: dict[str, str] | None = None,
        timeout_s: float | None = None,
        memory_mb: int | None = None,
    ) -> SandboxResult:
        if not cmd or not all(isinstance(part, str) for part in cmd):
            raise ValueError("cmd must be a non-empty list of strings")
        workdir = self._checked_workdir(workdir)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        memory_mb = self.memory_mb if memory_mb is None else memory_mb
        if timeout_s <= 0 or memory_mb <= 0:
            raise ValueError("timeout_s and memory_mb must be positive")
        child_env = self._environment(workdir, env or {})
        io_dir = Path(tempfile.mkdtemp(prefix=".sandbox-io-", dir=workdir))
        try:
            return self._run(cmd, workdir, child_env, io_dir, timeout_s, memory_mb)
        finally:
            for f in io_dir.iterdir():
                f.unlink()
            io_dir.rmdir()

    def _checked_workdir(self, workdir: Path) -> Path:
        resolved = Path(workdir).resolve()
        if not resolved.is_relative_to(self.root):
            raise ValueError(f"sandbox workdir {resolved} is outside the sandbox root {self.root}")
        resolved.mkdir(parents=True, exist_ok=True)
        return resolved

    @staticmethod
    def _environment(workdir: Path, extra: dict[str, str]) -> dict[str, str]:
        # Built from nothing: secrets of the control plane (API keys, cloud credentials) must not leak.
        env = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir / ".tmp"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
        }
        for key, value in extra.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key:
                raise ValueError(f"invalid environment entry {key!r}")
            env[key] = value
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        return env

    def _run(self, cmd, workdir, env, io_dir, timeout_s, memory_mb) -> SandboxResult:
        cap = memory_mb * 1024 * 1024

        def limit() -> None:  # runs in the child between fork and exec
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        out_path, err_path = io_dir / "stdout", io_dir / "stderr"
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            # preexec_fn only calls setrlimit: the cap must be in force before the command's first byte runs.
            proc = subprocess.Popen(
                cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, preexec_fn=limit, close_fds=True,  # noqa: PLW1509
            )
        timed_out, peak_vms = False, 0
        try:
            while not _exited(proc.pid):
                peak_vms = max(peak_vms, _tree_vms(proc.pid))
                if time.monotonic() - start >= timeout_s:
                    timed_out = True
                    self._terminate(proc.pid)
                    break
                time.sleep(POLL_S)
        finally:
            # The leader is a zombie (or alive) here, so its process group id cannot have been reused:
            # killing the group cannot hit an unrelated process. Strays left behind die with it.
            _kill_group(proc.pid, signal.SIGKILL)
            returncode = proc.wait()
        duration = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)

        memory_exceeded = not timed_out and _memory_evidence(returncode, stdout, stderr, peak_vms, cap)
        if timed_out:
            reason = f"killed after {timeout_s:g} s time limit"
        elif memory_exceeded:
            reason = f"exceeded the {memory_mb} MiB memory limit"
        elif returncode < 0:
            reason = f"killed by signal {_signal_name(-returncode)}"
        else:
            reason = None
        return SandboxResult(returncode, timed_out, memory_exceeded, round(duration, 3), stdout, stderr, reason)

    def _terminate(self, pid: int) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after the grace period."""
        strays = _descendants(pid)  # also those that left the process group with setsid()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _kill_group(pid, sig)
            for p in strays:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + self.grace_s
                while time.monotonic() < deadline and not _exited(pid):
                    time.sleep(POLL_S)
                strays += [p for p in _descendants(pid) if p not in strays]


def _exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (the zombie keeps its pid and group reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _tree_vms(pid: int) -> int:
    """Largest virtual size of any process in the tree: RLIMIT_AS applies to each process alone."""
    peak = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, p.memory_info().vms)
    return peak


def _memory_evidence(returncode: int, stdout: str, stderr: str, peak_vms: int, cap: int) -> bool:
    if returncode == 0:
        return False
    if MEMORY_TEXT_RE.search(stderr) or MEMORY_TEXT_RE.search(stdout):
        return True
    # A crash is only blamed on the cap if a process was seen close to it; a plain segfault is a bug.
    return returncode < 0 and -returncode in MEMORY_SIGNALS and peak_vms >= 0.9 * cap


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _tail(path: Path, limit: int = TAIL_CHARS) -> str:
    size = path.stat().st_size
    # Four bytes per character at most in UTF-8, so this many bytes always hold `limit` characters.
    with open(path, "rb") as f:
        f.seek(max(0, size - 4 * limit))
        text = f.read().decode("utf-8", errors="replace")
    if len(text) <= limit and size <= 4 * limit:
        return text
    return f"[... output truncated, last {limit} characters follow ...]\n" + text[-limit:]
