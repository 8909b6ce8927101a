"""Child process of the agent kill test: forks ``scopepilot run`` sessions on request.

Run as ``python -m tests.run_kill_child`` from the repository root. It imports the agent once,
prints ``READY``, then reads one JSON list of ``scopepilot`` arguments per line from stdin; for
each it forks a process that runs ``agent.cli.main(arguments)`` (output to /dev/null), prints
``PID <pid>``, waits for it and prints ``EXIT <status>`` (``-9`` when it was killed). Forking a
warm interpreter makes a kill trial cost milliseconds instead of an interpreter start, so the
test can afford many trials. No threads run in this process, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import sys

import tqdm  # noqa: F401

# Imported before forking so that each session starts warm (they are not used here).
import agent.cli
import agent.loop
import agent.perception.classical
import agent.perception.quality
import agent.pipeline
import agent.recorder
import agent.replay
import agent.resume
import agent.session
import agent.summary
import drivers.registry
import drivers.sim  # noqa: F401
import policies.rule  # noqa: F401


def main() -> None:
    print("READY", flush=True)
    for line in sys.stdin:
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the session
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = 1
            try:
                code = agent.cli.main(argv)
            finally:
                os._exit(code)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"EXIT {code}", flush=True)


if __name__ == "__main__":
    main()
