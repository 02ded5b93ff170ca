"""What survives a SIGKILL of ``asyncproc run``: each rank starts a helper that double-forks
and calls ``setsid()`` (so the launcher, a subreaper, adopts it, out of every rank's group,
session and tree); then the launcher is SIGKILLed. Counts the helpers still alive 5 s
later, and whether the launcher's temporary folder is still there.

    .venv/bin/python benchmarks/launcher_sigkill.py [-n 8] [--backend asyncio]
    ASYNCPROC_NO_CGROUP=1 .venv/bin/python benchmarks/launcher_sigkill.py   # without cgroups
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

RANK = textwrap.dedent(
    """
    import os, subprocess, sys, time
    print("errfile", os.environ["TORCHELASTIC_ERROR_FILE"], flush=True)
    helper = ("import os, time; os.setsid();"
              "open(os.path.join(os.environ['PID_DIR'], str(os.getpid())), 'w').close(); time.sleep(120)")
    middle = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {helper!r}])"
    subprocess.run([sys.executable, "-c", middle], check=True)
    while len(os.listdir(os.environ["PID_DIR"])) < int(os.environ["EXPECT"]):
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(120)
    """
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--backend", default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as pid_dir:
        env = {**os.environ, "PID_DIR": pid_dir, "EXPECT": str(args.n)}
        launcher = subprocess.Popen(
            [sys.executable, "-m", "asyncproc", "run", "-n", str(args.n), "--backend", args.backend, "--",
             sys.executable, "-c", RANK], stdout=subprocess.PIPE, text=True, env=env)
        assert launcher.stdout is not None
        lines = [launcher.stdout.readline() for _ in range(2 * args.n)]
        folder = os.path.dirname(os.path.dirname(next(line.split()[-1] for line in lines if "errfile" in line)))
        helpers = [int(name) for name in os.listdir(pid_dir)]
        launcher.kill()
        launcher.wait()
        time.sleep(5)  # a measurement, not a synchronisation: what is still there after 5 s
        survivors = [pid for pid in helpers if alive(pid)]
        print(f"{args.backend}: {len(survivors)} of {len(helpers)} adopted helpers survived the launcher's SIGKILL; "
              f"temporary folder {'left behind' if os.path.exists(folder) else 'removed'}")
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
