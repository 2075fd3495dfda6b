"""Child processes that never outlive us: Flower's SuperLink, SuperNodes and `flwr` commands.

Flower processes spawn children of their own. A SuperNode's `flower-superexec` and its
`flwr-clientapp` processes stay in the SuperNode's process group, but the SuperLink starts its
`flower-superexec` in a *new session* (`start_new_session=True`), which then starts
`flwr-serverapp` processes in that session. Signalling one process group is therefore not
enough: `ManagedProcess` also remembers every descendant it sees in `/proc` (pid plus start
time, so a reused pid is never signalled), and every member of a session one of them leads
(an orphan keeps its session when its parent dies), and signals those and their groups too.

Every started process is kept in a registry that `stop_all` empties; it runs at interpreter
exit and on SIGINT/SIGTERM (then the previous handler runs), so a crashed test or an
interrupted demo leaves no Flower process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from federation.errors import DeploymentError

logger = logging.getLogger(__name__)

# Flower's own shutdown handlers give their servers about 1 s each; 10 s covers all of them.
DEFAULT_GRACE_S = 10.0
_POLL_S = 0.1
_KILL_WAIT_S = 5.0
_LOG_TAIL_CHARS = 2000


@dataclass(frozen=True, order=True)
class ProcessId:
    """A process identity that survives pid reuse: the pid and its kernel start time."""

    pid: int
    start_time: int


def process_exists(process: ProcessId) -> bool:
    """Whether that very process still runs (a zombie or a reused pid counts as gone)."""
    info = _read_stat(process.pid)
    return info is not None and info[4] == process.start_time and info[0] != "Z"


def group_exists(pgid: int) -> bool:
    """Whether any process, zombies included, is left in process group `pgid` (`killpg(0)`)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class ManagedProcess:
    """One command running in its own session, logged to a file, stopped with its children.

    Args:
        command: The program and its arguments.
        name: A short name for messages (e.g. `superlink`, `node hospital-a`).
        log_path: File that receives stdout and stderr (appended to).
        env: The complete environment of the child; default: this process's environment.
        cwd: Working directory of the child; default: the log file's folder.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        if not command:
            raise ValueError(f"command for {name!r} is empty")
        self.command = [str(part) for part in command]
        self.name = name
        self.log_path = Path(log_path)
        self._env = dict(os.environ if env is None else env)
        self._cwd = Path(cwd) if cwd is not None else self.log_path.parent
        self._popen: subprocess.Popen[bytes] | None = None
        self._seen: set[ProcessId] = set()
        self._leaders: set[ProcessId] = set()  # seen processes that led their own session
        self._log_offset = 0
        self._start_time = -1

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ManagedProcess:
        """Start the command in a new session (its own process group) and register it.

        Returns:
            This object, started.

        Raises:
            DeploymentError: It is already running, or the program cannot be executed.
        """
        if self.alive:
            raise DeploymentError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _install_exit_handlers()
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            try:
                self._popen = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self._env,
                    cwd=self._cwd,
                    start_new_session=True,
                )
            except OSError as err:
                raise DeploymentError(
                    f"cannot start {self.name} ({self.command[0]}): {err}; check that the "
                    "program is installed in this environment"
                ) from err
        info = _read_stat(self._popen.pid)
        self._start_time = info[4] if info is not None else -1
        self._seen.add(ProcessId(self._popen.pid, self._start_time))
        with _REGISTRY_LOCK:
            _REGISTRY[self] = None
        logger.debug("started %s (pid %d): %s", self.name, self._popen.pid, self.command)
        return self

    @property
    def pid(self) -> int:
        """Pid of the started command; it is also the id of its process group and session."""
        if self._popen is None:
            raise DeploymentError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def alive(self) -> bool:
        """Whether the command itself is still running."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the command (negative: killed by that signal); None while running."""
        return None if self._popen is None else self._popen.poll()

    def wait(self, *, timeout: float) -> int:
        """Wait at most `timeout` seconds for the command to exit and return its status.

        Raises:
            DeploymentError: It still runs after `timeout` seconds.
        """
        if self._popen is None:
            raise DeploymentError(f"{self.name} was never started")
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(
                f"{self.name} still runs after {timeout:g} s; see {self.log_path}"
            ) from err

    def stop(self, *, grace: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM the process group and every known descendant, then SIGKILL what is left.

        Idempotent; also cleans up children left behind by a command that already exited.

        Args:
            grace: Seconds to wait after SIGTERM before SIGKILL.

        Returns:
            The exit status of the command, or None if it was never started.
        """
        stop_processes([self], grace=grace)
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL the group and every known descendant at once, like a crash of the host.

        Returns the command's exit status (None if it was never started).
        """
        if self._popen is None:
            return None
        self._signal_all(signal.SIGKILL, _process_table())
        _wait_gone([self], timeout=_KILL_WAIT_S)
        self._unregister()
        return self._popen.wait()

    # -- observation -------------------------------------------------------------------------

    def descendants(self) -> list[ProcessId]:
        """Refresh and return the live processes this command started, directly or not."""
        self._follow(_process_table())
        return sorted(p for p in self._live_seen() if self._popen and p.pid != self._popen.pid)

    @property
    def seen(self) -> frozenset[ProcessId]:
        """Every process of this command's tree observed so far, the command included."""
        return frozenset(self._seen)

    def read_log(self) -> str:
        """Return what this start wrote to the log so far (a restart appends to the file)."""
        try:
            with self.log_path.open("rb") as log_file:
                log_file.seek(self._log_offset)
                return log_file.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """Return the last `chars` characters of the log, for error messages."""
        return self.read_log()[-chars:]

    def wait_for_log(self, text: str, *, timeout: float) -> None:
        """Wait until `text` appears in the log.

        Raises:
            DeploymentError: The command exited first, or `timeout` seconds passed.
        """
        self._wait_until(lambda: text in self.read_log(), f"log {text!r}", timeout=timeout)

    def wait_for_port(self, host: str, port: int, *, timeout: float) -> None:
        """Wait until a TCP connection to `host:port` succeeds.

        Raises:
            DeploymentError: The command exited first, or `timeout` seconds passed.
        """
        self._wait_until(
            lambda: _port_open(host, port), f"listen on {host}:{port}", timeout=timeout
        )

    def _wait_until(self, ready: Callable[[], bool], what: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive:
                if ready():  # it did, then exited, between the two checks
                    return
                problem = f"exited with status {self.returncode} before it did {what}"
            elif time.monotonic() > deadline:
                problem = f"did not {what} within {timeout:g} s"
            else:
                time.sleep(_POLL_S)
                continue
            raise DeploymentError(
                f"{self.name} {problem}; log {self.log_path} ends with:\n{self.log_tail()}"
            )

    # -- internals ---------------------------------------------------------------------------

    def _follow(self, table: Mapping[int, _Stat]) -> None:
        """Remember every process of the tree and of the group found in `table`."""
        if self._popen is None:
            return
        roots = {process.pid for process in self._live_seen()} | {self._popen.pid}
        found = _tree(table, roots)
        if self._group_is_ours():
            found |= {pid for pid, row in table.items() if row[2] == self.pid}
        sessions = self._sessions(table) - {os.getsid(0)}
        found |= {pid for pid, row in table.items() if row[3] in sessions}
        seen = {ProcessId(pid, table[pid][4]) for pid in found}
        self._seen.update(seen)
        self._leaders.update(p for p in seen if table[p.pid][3] == p.pid)

    def _sessions(self, table: Mapping[int, _Stat]) -> set[int]:
        """Sessions led by processes of this tree (a session's id is its leader's pid). A
        process keeps its session when its parent dies, so a child that a leader started just
        before it exited is still found, though no longer in the tree. A dead leader's session
        still counts: its pid is not handed out again while the session has members."""
        return {
            leader.pid
            for leader in self._leaders
            if leader.pid not in table or table[leader.pid][4] == leader.start_time
        }

    def _group_is_ours(self) -> bool:
        """Whether group `pid` can only hold our processes (its id was not handed out again).

        While a group has members its id is never reused as a pid; once empty, a new process
        may get that pid and lead a new group of that id. So the group is someone else's
        exactly when a process with our pid but another start time exists.
        """
        info = _read_stat(self.pid)
        return info is None or info[4] == self._start_time

    def _live_seen(self) -> set[ProcessId]:
        return {process for process in self._seen if process_exists(process)}

    def _anything_left(self) -> bool:
        if self._popen is None:
            return False
        self._popen.poll()  # reap the command itself, else it lingers as a zombie group member
        group_left = self._group_is_ours() and group_exists(self.pid)
        return self.alive or group_left or bool(self._live_seen())

    def _signal_all(self, sig: signal.Signals, table: Mapping[int, _Stat]) -> None:
        if self._popen is None:
            return
        self._follow(table)
        groups = {self.pid} if self._group_is_ours() else set()
        for process in self._live_seen():
            if process.pid in table:
                groups.add(table[process.pid][2])
            # A process that exits between the snapshot and the signal is what we wanted.
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
        for group in groups - {0, 1, os.getpgrp()}:  # never our own group or init's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)

    def _unregister(self) -> None:
        with _REGISTRY_LOCK:
            _REGISTRY.pop(self, None)


def stop_processes(processes: Iterable[ManagedProcess], *, grace: float = DEFAULT_GRACE_S) -> None:
    """Stop several processes at once: SIGTERM all, wait up to `grace`, SIGKILL what is left.

    Args:
        processes: The processes; never-started or already-stopped ones are skipped.
        grace: Seconds all of them together get after SIGTERM before SIGKILL.
    """
    started = [process for process in processes if process._popen is not None]
    table = _process_table()
    for process in started:
        process._signal_all(signal.SIGTERM, table)
    deadline = time.monotonic() + grace
    while any(process._anything_left() for process in started):
        if time.monotonic() > deadline:
            left = [process for process in started if process._anything_left()]
            names = ", ".join(process.name for process in left)
            logger.warning("not stopped within %.0f s, sending SIGKILL: %s", grace, names)
            table = _process_table()
            for process in left:
                process._signal_all(signal.SIGKILL, table)
            _wait_gone(left, timeout=_KILL_WAIT_S)
            break
        time.sleep(_POLL_S)
        table = _process_table()  # follow children spawned while shutting down
        for process in started:
            process._follow(table)
    for process in started:
        process._unregister()


def _wait_gone(processes: Sequence[ManagedProcess], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(process._anything_left() for process in processes):
        if time.monotonic() > deadline:
            names = ", ".join(process.name for process in processes if process._anything_left())
            raise DeploymentError(f"processes of {names} survive SIGKILL (uninterruptible?)")
        time.sleep(_POLL_S)


def stop_all(*, grace: float = DEFAULT_GRACE_S) -> None:
    """Stop every registered process, all at once (see `stop_processes`)."""
    with _REGISTRY_LOCK:
        processes = list(reversed(_REGISTRY))
    stop_processes(processes, grace=grace)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# -- registry and signal handling ---------------------------------------------------------------

# Insertion-ordered (a dict used as an ordered set): stop_all stops the newest first.
_REGISTRY: dict[ManagedProcess, None] = {}
_REGISTRY_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _install_exit_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still applies
    for sig in (signal.SIGINT, signal.SIGTERM):
        _PREVIOUS_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all(grace=3.0)
    previous = _PREVIOUS_HANDLERS.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# -- /proc helpers ------------------------------------------------------------------------------

# (state, ppid, pgrp, session, start time) of one /proc/<pid>/stat line.
_Stat = tuple[str, int, int, int, int]


def _read_stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rfind(")") + 2 :].split()
    # After "pid (comm) ": state ppid pgrp session ... ; starttime is field 22 of the line.
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _process_table() -> dict[int, _Stat]:
    table: dict[int, _Stat] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table  # not Linux: process groups are still signalled, descendants are not
    for entry in proc.iterdir():
        if entry.name.isdigit() and (info := _read_stat(int(entry.name))) is not None:
            table[int(entry.name)] = info
    return table


def _tree(table: Mapping[int, _Stat], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info[1], []).append(pid)
    found: set[int] = set()
    stack = [root for root in roots if root in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
