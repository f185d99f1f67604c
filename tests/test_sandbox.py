"""Tests of the subprocess sandbox: limits, kills, environment scrubbing and workdir confinement."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from codemind_dagster.resources.sandbox import SandboxResult, SubprocessSandbox

PY = sys.executable


def script(workdir: Path, name: str, body: str) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def gone(pid: int, within_s: float = 5.0) -> bool:
    """The process no longer runs (a zombie waiting for a reaper that is not ours counts as gone)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sandbox(tmp_path: Path) -> SubprocessSandbox:
    return SubprocessSandbox(tmp_path / "root", timeout_s=30, memory_mb=1024, grace_s=0.5)


def test_normal_command_returns_output_and_code(sandbox: SubprocessSandbox) -> None:
    work = sandbox.root / "job"
    cmd = [PY, "-c", "import os, sys; print('hello', os.getcwd()); print('oops', file=sys.stderr); sys.exit(3)"]
    result = sandbox.run(cmd, workdir=work)
    assert isinstance(result, SandboxResult)
    assert result.returncode == 3
    assert result.stdout == f"hello {work.resolve()}\n"
    assert result.stderr == "oops\n"
    assert not result.timed_out and not result.memory_exceeded and result.reason is None
    assert not result.ok
    assert 0 < result.duration_s < 30
    assert sandbox.run([PY, "-c", "pass"], workdir=work).ok
    # Capture files are cleaned up; the directory stays the command's own.
    assert sorted(p.name for p in work.iterdir()) == [".tmp"]


def test_stdin_is_empty(sandbox: SubprocessSandbox) -> None:
    result = sandbox.run([PY, "-c", "import sys; print(repr(sys.stdin.read()))"], workdir=sandbox.root / "w")
    assert result.stdout.strip() == "''"


def test_sleeping_script_and_its_grandchild_are_killed_at_the_time_limit(sandbox: SubprocessSandbox) -> None:
    work = sandbox.root / "sleepy"
    path = script(work, "sleepy.py", """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL will do
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        open("grandchild.pid", "w").write(str(child.pid))
        print("started", flush=True)
        while True:
            time.sleep(1)
    """)
    started = time.monotonic()
    result = sandbox.run([PY, path], workdir=work, timeout_s=1.5)
    elapsed = time.monotonic() - started
    assert result.timed_out and not result.memory_exceeded
    assert result.reason == "killed after 1.5 s time limit"
    assert result.returncode == -9
    assert "started" in result.stdout
    assert 1.5 <= elapsed < 6
    assert gone(int((work / "grandchild.pid").read_text()))


def test_grandchild_that_escaped_the_process_group_is_killed_too(sandbox: SubprocessSandbox) -> None:
    work = sandbox.root / "escape"
    path = script(work, "escape.py", """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"], start_new_session=True)
        open("grandchild.pid", "w").write(str(child.pid))
        time.sleep(1000)
    """)
    result = sandbox.run([PY, path], workdir=work, timeout_s=1)
    assert result.timed_out
    assert gone(int((work / "grandchild.pid").read_text()))


def test_background_process_does_not_outlive_a_finished_command(sandbox: SubprocessSandbox) -> None:
    work = sandbox.root / "bg"
    path = script(work, "bg.py", """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        open("bg.pid", "w").write(str(child.pid))
    """)
    result = sandbox.run([PY, path], workdir=work)
    assert result.ok
    assert gone(int((work / "bg.pid").read_text()))


def test_allocating_4_gib_under_a_512_mib_cap_is_reported_as_memory_exceeded(sandbox: SubprocessSandbox) -> None:
    result = sandbox.run([PY, "-c", "b = bytearray(4 * 1024 ** 3)"], workdir=sandbox.root / "mem", memory_mb=512)
    assert result.memory_exceeded and not result.timed_out
    assert result.returncode != 0
    assert result.reason == "exceeded the 512 MiB memory limit"
    assert "MemoryError" in result.stderr


def test_gradual_allocation_hits_the_cap(sandbox: SubprocessSandbox) -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))"
    result = sandbox.run([PY, "-c", code], workdir=sandbox.root / "mem2", memory_mb=256)
    assert result.memory_exceeded
    assert result.reason == "exceeded the 256 MiB memory limit"


def test_crashes_and_failures_are_not_misreported_as_memory(sandbox: SubprocessSandbox) -> None:
    work = sandbox.root / "crash"
    segv = sandbox.run([PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"], workdir=work)
    assert segv.returncode == -11 and not segv.memory_exceeded and not segv.timed_out
    assert segv.reason == "killed by signal SIGSEGV"
    # Talking about MemoryError in a successful run, or failing for another reason, is not running out.
    talk = sandbox.run([PY, "-c", "print('MemoryError')"], workdir=work)
    assert talk.ok and talk.reason is None
    fail = sandbox.run([PY, "-c", "raise ValueError('no MemoryError here')"], workdir=work)
    assert fail.returncode == 1 and not fail.memory_exceeded and fail.reason is None


def test_parent_secrets_do_not_reach_the_child(sandbox: SubprocessSandbox, monkeypatch) -> None:
    secrets = {
        "ANTHROPIC_API_KEY": "sk-ant-secret", "OPENAI_API_KEY": "sk-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret", "CODEMIND_DATABASE_URL": "postgresql://u:pw@db/x",
        "VIRTUAL_ENV": "/somewhere", "PYTHONPATH": "/injected",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    work = sandbox.root / "env"
    result = sandbox.run(
        [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        workdir=work, env={"SERVICE_MODE": "test"},
    )
    assert result.ok, result.stderr
    child_env = json.loads(result.stdout)
    # Python itself may add LC_CTYPE when it coerces the C locale; nothing else appears.
    assert set(child_env) - {"LC_CTYPE"} == {
        "PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "SERVICE_MODE",
    }
    assert child_env["HOME"] == str(work.resolve())
    assert child_env["TMPDIR"] == str(work.resolve() / ".tmp")
    assert (child_env["PYTHONHASHSEED"], child_env["SERVICE_MODE"]) == ("0", "test")
    for value in secrets.values():
        assert value not in result.stdout


def test_explicitly_passed_variables_reach_the_child(sandbox: SubprocessSandbox, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "parent-value")
    result = sandbox.run(
        [PY, "-c", "import os; print(os.environ['OPENAI_API_KEY'])"],
        workdir=sandbox.root / "x", env={"OPENAI_API_KEY": "explicit"},
    )
    assert result.stdout.strip() == "explicit"


def test_workdir_outside_root_is_refused(sandbox: SubprocessSandbox, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the sandbox root"):
        sandbox.run([PY, "-c", "pass"], workdir=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="outside the sandbox root"):
        sandbox.run([PY, "-c", "pass"], workdir=sandbox.root / ".." / "sneaky")
    sandbox.root.mkdir(parents=True, exist_ok=True)
    (sandbox.root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="outside the sandbox root"):
        sandbox.run([PY, "-c", "pass"], workdir=sandbox.root / "link" / "out")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "sneaky").exists()


def test_output_is_bounded_to_its_tail(sandbox: SubprocessSandbox) -> None:
    code = "import sys\nfor i in range(20000): print(f'line {i:06d}')\nprint('the end')"
    result = sandbox.run([PY, "-c", code], workdir=sandbox.root / "big")
    assert result.ok
    assert result.stdout.endswith("line 019999\nthe end\n")
    assert result.stdout.startswith("[... output truncated")
    assert len(result.stdout) < 20_100


def test_bad_arguments_are_refused(sandbox: SubprocessSandbox) -> None:
    with pytest.raises(ValueError):
        sandbox.run([], workdir=sandbox.root / "a")
    with pytest.raises(ValueError):
        sandbox.run([PY, "-c", "pass"], workdir=sandbox.root / "a", env={"A=B": "x"})
