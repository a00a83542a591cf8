"""The one subprocess helper.

Owns: running external programs with an argument list, a mandatory timeout and a
clean error type (:class:`ProcError`, :class:`ProcTimeout`).

Must not: use ``shell=True``, run anything without a timeout, or put the full argv
(which may carry host paths) into an exception's ``str()`` — the argv is kept on the
``argv`` attribute for logs, while the message names only the program.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence

STDERR_TAIL_CHARS = 2000
"""How much of a failed command's stderr is kept on the error (its tail)."""


def _tail(data: bytes | None, limit: int = STDERR_TAIL_CHARS) -> str:
    text = (data or b"").decode("utf-8", errors="replace").strip()
    return text[-limit:]


class ProcError(Exception):
    """A subprocess failed: carries the program name, exit code and stderr tail."""

    def __init__(
        self,
        cmd: str,
        returncode: int | None,
        stderr: str = "",
        argv: Sequence[str] = (),
    ) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        self.argv = list(argv)
        super().__init__(self._message())

    def _message(self) -> str:
        if self.returncode is None:
            msg = f"{self.cmd} could not be started"
        else:
            msg = f"{self.cmd} failed with exit code {self.returncode}"
        return f"{msg}: {self.stderr}" if self.stderr else msg


class ProcTimeout(ProcError):
    """A subprocess ran past its timeout and was killed."""

    def __init__(
        self, cmd: str, timeout: float, stderr: str = "", argv: Sequence[str] = ()
    ) -> None:
        self.timeout = timeout
        super().__init__(cmd, None, stderr, argv)

    def _message(self) -> str:
        msg = f"{self.cmd} timed out after {self.timeout:g}s"
        return f"{msg}: {self.stderr}" if self.stderr else msg


PRLIMIT = "prlimit"
"""util-linux's prlimit: sets a resource limit on the program it then executes."""


def _limited(argv: list[str], memory_limit: int | None
             ) -> tuple[list[str], Callable[[], None] | None]:
    """The argv (and, without prlimit, a preexec_fn) that caps the child's address space.

    prlimit is preferred: a preexec_fn is not safe in a process that runs threads (the
    worker and the scheduler do), so it is only the fallback where prlimit is missing.
    """
    if memory_limit is None:
        return argv, None
    if memory_limit < 1:
        raise ValueError("memory_limit must be a positive number of bytes")
    prlimit = shutil.which(PRLIMIT)
    if prlimit is not None:
        return [prlimit, f"--as={memory_limit}", "--", *argv], None

    def preexec() -> None:  # pragma: no cover - only where util-linux is missing
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    return argv, preexec


def run(
    args: Sequence[str],
    *,
    timeout: float,
    input: bytes | None = None,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    memory_limit: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` (an argument list, never a shell string) and capture its output.

    ``memory_limit`` (bytes) caps the program's address space (RLIMIT_AS), so a crafted
    input cannot make it take the machine's memory; past it, allocations fail and the
    program exits non-zero.

    Raises :class:`ProcTimeout` past ``timeout`` seconds, :class:`ProcError` when the
    program cannot be started or (with ``check``) exits non-zero.
    """
    if isinstance(args, str | bytes):
        raise TypeError("run() takes an argument list, not a string")
    argv = [os.fspath(a) for a in args]
    if not argv:
        raise ValueError("run() needs at least the program name")
    name = os.path.basename(argv[0])
    full_argv, preexec = _limited(argv, memory_limit)
    try:
        proc = subprocess.run(
            full_argv,
            input=input,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
            shell=False,
            preexec_fn=preexec,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcTimeout(name, timeout, _tail(exc.stderr), argv) from None
    except OSError as exc:
        raise ProcError(name, None, exc.strerror or str(exc), argv) from None
    if check and proc.returncode != 0:
        raise ProcError(name, proc.returncode, _tail(proc.stderr), argv)
    return proc
