"""A code-running tool: the policy's Python runs in a separate, resource-limited process without network.

Why a process and not a thread: a thread cannot be killed, shares the trainer's memory and can touch its
state; a child process can be limited (memory, CPU, file size, open files), killed on timeout, and started
in a fresh empty directory.

Network: the command is wrapped in `unshare -rn` (a new user + network namespace: only a downed loopback, so
every connect fails at the kernel) when `unshare` exists and a one-time probe shows it works here. Otherwise a
prelude in the child replaces `socket.socket` / `socket.create_connection` with functions that raise. That
fallback is a Python-level block, NOT a sandbox: code can get around it (e.g. `_socket`, ctypes, a subprocess).
Neither path isolates the file system: the child runs as the same user and can read what that user can.

Limits are set in `preexec_fn` (between fork and exec). Python warns that preexec_fn is unsafe with threads
(the child could block on a lock another thread held at fork); ours calls only `resource.setrlimit`, which
takes no Python-level locks, so running it from `ToolRunner`'s threads is the accepted risk.
The wall-clock `TIMEOUT_S` (10 s) is longer than `ToolRunner`'s default 5 s: give the runner more than 10 s,
or it reports a timeout while the child still runs to its own limit.
"""

from __future__ import annotations

import functools
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0  # wall clock per run; also the CPU-seconds limit
MEMORY_BYTES = 1 << 30  # RLIMIT_AS: 1 GiB of address space
FILE_BYTES = 10 * 1000 * 1000  # RLIMIT_FSIZE: 10 MB, which also bounds stdout/stderr (they go to files)
OPEN_FILES = 64  # RLIMIT_NOFILE
MAX_OUTPUT_CHARS = 4000
_TRUNCATED = "\n...[output truncated]"

# Runs in the child: reads the code from stdin (no argv length limit), optionally blocks sockets, executes it
# as __main__ under the file name "<code>" so tracebacks point at the policy's own lines.
_BOOTSTRAP = """\
import sys
_code = sys.stdin.read()
sys.stdin = open(__import__("os").devnull)
if {block_sockets}:
    import socket
    def _no_network(*args, **kwargs):
        raise OSError("network access is disabled in this tool")
    socket.socket = _no_network
    socket.create_connection = _no_network
    socket.socketpair = _no_network
    del socket, _no_network
exec(compile(_code, "<code>", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


def _limit_resources(timeout_s: float) -> None:
    """preexec_fn: limits the child inherits (and `unshare` passes on to Python, which it execs)."""
    cpu = max(1, math.ceil(timeout_s))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@functools.lru_cache(maxsize=1)
def unshare_works() -> bool:
    """True when `unshare -rn` can make a user + network namespace here (probed once: containers often forbid it)."""
    path = shutil.which("unshare")
    if path is None:
        return False
    try:
        return subprocess.run([path, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read_head(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit * 4 + 4)  # utf-8: at most 4 bytes a character
    text = data.decode("utf-8", errors="replace")
    if len(text) > limit or os.path.getsize(path) > len(data):
        return text[: limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def _last_line(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip() if lines else ""


def run_python(code: str, timeout_s: float = TIMEOUT_S, isolate_network: bool | None = None) -> str:
    """Run `code` in a fresh process and return its stdout (at most 4000 characters).

    `isolate_network`: None = `unshare -rn` when it works here, else the socket-blocking prelude; False forces
    the prelude (tests use it). Raises TimeoutError past `timeout_s` (wall clock or CPU), RuntimeError with the
    last line of stderr on a non-zero exit, ValueError when `code` is not a string.
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a string, got {type(code).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    use_unshare = unshare_works() if isolate_network is None else (isolate_network and unshare_works())
    command = [sys.executable, "-I", "-c", _BOOTSTRAP.format(block_sockets=not use_unshare)]
    if use_unshare:
        command = [shutil.which("unshare") or "unshare", "-rn", *command]
    with tempfile.TemporaryDirectory(prefix="rlhf_python_tool_") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")  # beside, not in, its cwd
        workdir = os.path.join(tmp, "work")
        os.mkdir(workdir)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env,
                                    start_new_session=True, preexec_fn=lambda: _limit_resources(timeout_s))
            try:
                proc.communicate(code.encode("utf-8", errors="replace"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise TimeoutError(f"the code ran longer than {timeout_s:g} s") from None
            finally:
                _kill_group(proc)  # children it forked share its session: leave none behind
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # the CPU limit hit before the wall clock
            raise TimeoutError(f"the code used more than {math.ceil(timeout_s)} s of CPU")
        if proc.returncode != 0:
            raise RuntimeError(_last_line(err_path) or f"the code exited with status {proc.returncode}")
        return _read_head(out_path, MAX_OUTPUT_CHARS)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def python(code: str) -> str:
    """Run a Python program and return what it prints to stdout.

    Args:
        code: A complete Python program; use print() to show results, e.g. "print(sum(range(10)))".

    Returns:
        The program's standard output (at most 4000 characters).
    """
    return run_python(code, TIMEOUT_S)
