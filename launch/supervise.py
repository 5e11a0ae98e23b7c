"""Run a group of processes as one job, like torchrun's agent: start them, and when one dies
before the others, stop the rest, say in one line which one was lost, how, and where the run
stands, then start the group again with the same command, up to --max_restarts times.

  python launch/supervise.py --processes=2 --max_restarts=3 -- ARGS...     (launch/local.sh)
  python launch/supervise.py --max_restarts=3 -- srun --kill-on-bad-exit=1 ...   (SLURM)

With --processes=N it starts N `python -m clipjax.main --distributed ... ARGS` here, their
coordinator on the loopback address; otherwise the command after `--` is the group (srun,
which tears its tasks down itself). Each process's output goes to LOGDIR/process_<i>.log;
process 0's is also shown on this terminal until a process is lost, so that the native dumps
of the survivors (gloo's abort, the coordination service's) stay in the logs.

The exit status is the first non-zero status of the last start (0 when all succeed; 128 +
the signal for a process killed by one). A status of 1 (the run cannot go on: it diverged, or
the disk is full) or 2 (a bad config or command) is not retried: the same command would fail
again. Only the standard library: it runs wherever the job starts.
"""

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

POLL = 0.05  # seconds between looks at the processes
NOT_RETRIED = {1: "the run cannot go on", 2: "a bad config or command"}
# The first line of a native crash report (glog's fatal line, C++'s std::terminate, Python's
# fault handler): from there on, a process's output stays in its log.
NATIVE_CRASH = re.compile(r"^(F\d{4} |terminate called|\*\*\* Check failure|Fatal Python error)")
# How long processes that exited on their own (a stop signal, a bad config) are given to
# follow before the rest are killed: they save a checkpoint together, or the runtime ends them.
FOLLOW_SECONDS = 60


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=0, help="N local clipjax processes")
    parser.add_argument("--max_restarts", type=int, default=0, help="restarts after a loss")
    parser.add_argument("--logdir", default=None, help="default /tmp/clipjax_local_<pid>")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- ARGS (see above)")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.max_restarts < 0 or args.processes < 0:
        parser.error("--processes and --max_restarts must be at least 0.")
    if not args.processes and not args.command:
        parser.error("give the group's command after --, or --processes=N and clipjax's flags.")
    args.logdir = pathlib.Path(args.logdir or f"/tmp/clipjax_local_{os.getpid()}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(args) -> list[tuple[str, list[str]]]:
    """The group's (name, command) pairs for one start, with a fresh coordinator port each
    time (or $PORT), bound to the loopback address: the processes are all here."""
    if not args.processes:
        return [(os.path.basename(args.command[0]), args.command)]
    address = f"127.0.0.1:{os.environ.get('PORT') or free_port()}"
    module = os.environ.get("MODULE", "clipjax.main")
    return [
        (
            f"process {i}",
            [sys.executable, "-m", module, "--distributed", f"--coordinator={address}"]
            + [f"--coordinator_bind={address}", f"--num_processes={args.processes}"]
            + [f"--process_id={i}", *args.command],
        )
        for i in range(args.processes)
    ]


class Member:
    """One process of the group. Its output goes to its log; process 0's also to this
    terminal, line by line, where `show(line)` says so."""

    def __init__(self, index: int, name: str, command: list[str], log, show):
        self.index, self.name, self.show = index, name, show
        self.log = open(log, "ab", buffering=0)  # noqa: SIM115 - closed in `close`
        pipe = subprocess.PIPE if index == 0 else self.log
        # Its own process group, so that a kill reaches its Grain workers too.
        self.process = subprocess.Popen(command, stdout=pipe, stderr=pipe, start_new_session=True)
        self.threads = []
        if index == 0:
            for stream, terminal in (
                (self.process.stdout, sys.stdout),
                (self.process.stderr, sys.stderr),
            ):
                self.threads.append(threading.Thread(target=self._relay, args=(stream, terminal)))
                self.threads[-1].start()

    def _relay(self, stream, terminal) -> None:
        for line in iter(stream.readline, b""):
            self.log.write(line)
            if self.show(line.decode(errors="replace")):
                terminal.buffer.write(line)
                terminal.flush()

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def kill(self, signum: int) -> None:
        """SIGKILL reaches its Grain workers too; other signals only the trainer, which
        passes them on."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if signum == signal.SIGKILL:
                    os.killpg(self.process.pid, signum)
                else:
                    self.process.send_signal(signum)

    def close(self) -> None:
        self.process.wait()
        for thread in self.threads:
            thread.join()
        self.log.close()


def status_of(returncode: int) -> int:
    """The shell's status for a return code (128 + N for a process killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.workdir = workdir_of(args.command)
        self.members: list[Member] = []
        self.stop_signal = None  # a signal this supervisor received: passed on, no restart
        self.shown = threading.Event()

    def run(self) -> int:
        """Start the group until it succeeds, fails in a way a restart cannot mend, or the
        restarts are spent; its status."""
        self.args.logdir.mkdir(parents=True, exist_ok=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._pass_on)
        for start in range(self.args.max_restarts + 1):
            lost = self._start(start)
            if lost is None or self.stop_signal is not None:
                return self._status()
            code = lost.returncode
            last = start == self.args.max_restarts or code in NOT_RETRIED
            self._say(lost, None if last else start + 1)
            if last:
                return status_of(code)
        raise AssertionError("unreachable")

    def _pass_on(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: every process saves a checkpoint and stops; no restart."""
        del frame
        self.stop_signal = signum
        for member in self.members:
            member.kill(signal.SIGTERM)

    def _show(self, line: str) -> bool:
        """Whether a line of process 0 goes to the terminal: not once a process was killed (a
        survivor's error or dump, raised by the loss, follows that death and stays in its
        log), nor from the first line of a native crash on."""
        if NATIVE_CRASH.match(line) or any((m.returncode or 0) < 0 for m in self.members):
            self.shown.clear()
        return self.shown.is_set()

    def _status(self) -> int:
        return next((status_of(m.returncode) for m in self.members if m.returncode), 0)

    def _start(self, start: int) -> Member | None:
        """Start the group and wait until every process has ended; the one that failed first
        (None when all succeeded). Once one has failed, the others are stopped."""
        self.shown.set()
        self.members = []
        for index, (name, command) in enumerate(commands(self.args)):
            log = self.args.logdir / f"process_{index}.log"
            with open(log, "ab") as f:
                f.write(f"==== launch/supervise.py: start {start + 1} ====\n".encode())
            self.members.append(Member(index, name, command, log, self._show))
        lost = None
        while any(m.returncode is None for m in self.members):
            failed = [m for m in self.members if m.returncode]
            if lost is None and failed:
                # Where several ended at once, the one killed is lost, not one the runtime aborted.
                lost = min(failed, key=lambda m: (m.returncode == -signal.SIGABRT, m.index))
                self._stop_others(lost)
            time.sleep(POLL)
        for member in self.members:
            member.close()
        if lost is None:
            lost = next((m for m in self.members if m.returncode), None)
        if lost is not None:
            self._remove_unfinished_saves()
        return lost

    def _stop_others(self, first: Member) -> None:
        """A process killed (or aborted) leaves the others blocked in a collective: kill them
        now. One that exited by itself (a stop signal, a bad config) is followed by the
        others: give them `FOLLOW_SECONDS` to save and leave, then kill what is left."""
        if first.returncode > 0:
            deadline = time.monotonic() + FOLLOW_SECONDS
            while time.monotonic() < deadline and any(m.returncode is None for m in self.members):
                time.sleep(POLL)
        self.shown.clear()  # what the others print as they die stays in their logs
        for member in self.members:
            member.kill(signal.SIGKILL)

    def _remove_unfinished_saves(self) -> None:
        """With every process gone, the temporary folder of a save they did not finish is
        removed (the next run would remove it too)."""
        if self.workdir is not None:
            for folder in (self.workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(folder, ignore_errors=True)

    def _say(self, lost: Member, restart: int | None) -> None:
        """One line: who failed and how, where the run stands, and what happens next."""
        code, count = lost.returncode, len(self.members)
        # Every process stopping alike (a stop signal reaches all through the step) is the
        # group's doing, not one process's.
        alike = count > 1 and code >= 0 and all(m.returncode == code for m in self.members)
        who = f"all {count} processes" if alike else lost.name
        if code < 0:
            what = f"was lost (killed by {signal.Signals(-code).name})"
        elif code in NOT_RETRIED:
            what = f"failed (exit status {code}: {NOT_RETRIED[code]})"
        else:
            what = f"stopped (exit status {code})"
        line = f"launch: {who} {what}{self._progress()}"
        if count > 1 and not alike:
            line += f"; stopped the other {count - 1} process{'es' if count > 2 else ''}"
        if restart is not None:
            line += f"; restart {restart} of {self.args.max_restarts}"
        elif code not in NOT_RETRIED:
            spent = f", {self.args.max_restarts} restarts spent" if self.args.max_restarts else ""
            line += f"{spent}; the same command resumes"
        print(line + ".", file=sys.stderr, flush=True)

    def _progress(self) -> str:
        """' after step S; the last good checkpoint is C', read from a local workdir."""
        if self.workdir is None:
            return ""
        step = last_logged_step(self.workdir / "metrics.jsonl")
        text = f" after step {step}" if step is not None else " before its first logged step"
        folder = self.workdir / "checkpoints"
        steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()]
        if steps:
            return f"{text}; the last good checkpoint is {folder / str(max(steps))}"
        return f"{text}; no checkpoint yet"


def workdir_of(command: list[str]) -> pathlib.Path | None:
    """clipjax's --workdir in `command`, if it is a local folder."""
    for i, word in enumerate(command):
        value = word.removeprefix("--workdir=") if word.startswith("--workdir=") else None
        if word == "--workdir" and i + 1 < len(command):
            value = command[i + 1]
        if value is not None and "://" not in value:
            return pathlib.Path(value).absolute()
    return None


def last_logged_step(metrics: pathlib.Path) -> int | None:
    """The step of the last whole row of `metrics.jsonl` (a kill may cut the last line)."""
    try:
        text = metrics.read_bytes()
    except FileNotFoundError:
        return None
    for line in reversed(text[: text.rfind(b"\n") + 1].splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    status = Supervisor(args).run()
    if args.processes > 1:
        print(
            f"launch: {args.processes} processes exited (status {status}); logs in {args.logdir}",
            file=sys.stderr,
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
