"""The closed loop's supervisor stops its children however it is stopped.

Children run in sessions of their own (a Ctrl-C in the terminal reaches the supervisor only, which
then stops them in order). A SIGTERM (`timeout`, `kill`, a container stop) used to end the
supervisor outright and leave them running: `lightspan demo` under `timeout` left its
`lightspan serve` behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_sigterm_stops_the_supervisor_s_children(tmp_path: Path):
    parent = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the supervisor
            os.kill(child, 0)
    finally:
        parent.kill()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
