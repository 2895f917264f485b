"""The closed loop's supervisor stops its children however it is stopped.

Children run in sessions of their own (a Ctrl-C in the terminal reaches the supervisor only, which
then stops them in order). A SIGTERM (`timeout`, `kill`, a container stop) used to end the
supervisor outright and leave them running: `lightspan demo` under `timeout` left its
`lightspan serve` behind. A SIGKILL cannot be caught: the children's lifeline (`loop/lifeline.py`)
has the kernel stop them when the supervisor dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightspan.loop.supervisor import LIFELINE
from tests.helpers import ROOT

SUPERVISOR = """
import sys, time
from pathlib import Path
from lightspan.loop.supervisor import ClosedLoop
with ClosedLoop(workdir=Path(sys.argv[1]), store_url=None, resource="policy") as loop:
    child = loop._child("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.process.pid, flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def supervisor_with_a_child(workdir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A `ClosedLoop` in its own process with one sleeping child: (the supervisor, the child's
    pid). Both are killed on the way out, whatever the test did to them."""
    parent = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(workdir)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        yield parent, child
    finally:
        parent.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_stops_the_supervisor_s_children(tmp_path: Path):
    with supervisor_with_a_child(tmp_path) as (parent, child):
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the supervisor
            os.kill(child, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_supervisor_takes_its_children_with_it(tmp_path: Path):
    with supervisor_with_a_child(tmp_path) as (parent, child):
        os.kill(child, 0)  # running, in a session of its own
        parent.kill()  # SIGKILL: no handler runs, `close` never stops it
        parent.wait(30)
        deadline = time.monotonic() + 30
        while not exited(child):
            assert time.monotonic() < deadline, "the orphaned child still runs 30 s after its supervisor died"
            time.sleep(0.1)


def test_the_lifeline_refuses_to_start_a_command_whose_supervisor_is_gone():
    done = subprocess.run(
        [sys.executable, str(LIFELINE), "1", sys.executable, "-c", "print('started')"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if sys.platform.startswith("linux"):
        assert done.returncode == 1 and "started" not in done.stdout
        assert "supervisor 1 is gone" in done.stderr
    else:
        assert done.stdout == "started\n"


def exited(pid: int) -> bool:
    """Gone, or a zombie: reparented to init and not yet reaped, it has exited all the same."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError):
        return True
