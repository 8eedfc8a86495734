"""The guard of one simulation: stops every process of the run when `dermfed simulate` dies.

Started by `simulations.runner` with PR_SET_PDEATHSIG, it gets SIGTERM the moment its parent
ends, however it ends (SIGKILL included), and then stops every process whose environment
carries the run's marker or holds a file open in the run's Ray folder
(`common.processes.stop_marked`): the SuperLink, the SuperExec, the simulation and Ray's
daemons and actors. It also holds the run folder's lock until they are
gone, so that no second run starts in the folder meanwhile. On a normal end the runner stops
the processes itself and kills this guard.

    python -m simulations.reaper TOKEN [DIRECTORY ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time

from common.processes import stop_marked


def main() -> None:
    token, directories = sys.argv[1], sys.argv[2:]
    parent = os.getppid()

    def reap(*_):  # type: ignore[no-untyped-def]
        stop_marked(token, directories)
        os._exit(0)

    signal.signal(signal.SIGTERM, reap)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the runner, which stops the run itself
    while True:
        if os.getppid() != parent:  # the runner died before the death signal was armed
            reap()
        time.sleep(1.0)


if __name__ == "__main__":
    main()
