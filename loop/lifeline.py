"""Run a command that dies with its supervisor: `python lifeline.py PARENT_PID COMMAND...`.

The loop's children (trainer, server) run in sessions of their own, so that a Ctrl-C reaches
them only through the supervisor, which stops them in order. A supervisor that is killed
outright (SIGKILL, the OOM killer, a CI job's timeout) stops nobody, and its children would go
on holding ports, GPUs and the store's SQL endpoint. This shim asks Linux to send the command
SIGTERM when its parent dies (`PR_SET_PDEATHSIG`, which exec keeps), then becomes the command,
same pid. Run by path, not imported: a fresh single-threaded interpreter that imports nothing of
ours starts fast, and `prctl` is safe there (`Popen(preexec_fn=...)` is not, in the supervisor's
threaded process). Elsewhere than Linux it only runs the command.

Linux ties the signal to the thread that started the child, so the supervisor starts children
from the thread that lives as long as it does (the main thread in `lightspan demo`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: lifeline.py PARENT_PID COMMAND [ARG...]")
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the supervisor died before the request took effect
            raise SystemExit(f"supervisor {parent} is gone; not starting {command[0]}")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
