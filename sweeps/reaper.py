"""A watchdog beside a sweep driver that runs a private local Ray: when the driver ends, even by SIGKILL, the
processes it started (Ray's GCS, raylet, workers, dashboard and runtime-env agents, the MLflow server) are
stopped and Ray's temp dir is removed. It learns of the end from its stdin, a pipe only the driver holds.

Run as `python -m sweeps.reaper DRIVER_PID TEMP_DIR`; `start_reaper` does that.
"""

from __future__ import annotations

import select
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

POLL_S = 1.0


def start_reaper(temp_dir: str) -> subprocess.Popen:
    """The watchdog of this process and `temp_dir`; close its stdin (or die) to let it clean up."""
    import os

    reaper = subprocess.Popen([sys.executable, "-m", "sweeps.reaper", str(os.getpid()), temp_dir],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              start_new_session=True,  # Ctrl-C of the driver spares it
                              cwd=Path(__file__).resolve().parents[1])
    reaper.stdout.read(1)  # it has noted the driver's processes from before: Ray may start now
    return reaper


def stop_reaper(reaper: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """After the driver's own clean shutdown: the watchdog checks that nothing is left, then exits."""
    if reaper is None:
        return
    reaper.stdin.close()
    try:
        reaper.wait(timeout)
    except subprocess.TimeoutExpired:
        reaper.kill()


def _descendants(pid: int) -> set[tuple[int, float]]:
    """(pid, create time) of every process below `pid`; the create time guards against a reused PID."""
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    out = set()
    for p in procs:
        try:
            out.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return out


def _stop(seen: set[tuple[int, float]], grace: float = 5.0) -> None:
    procs = []
    for pid, created in seen:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> int:
    driver, temp_dir = int(argv[0]), argv[1]
    before = _descendants(driver)  # the driver's processes from before the sweep (and this one) are not its to stop
    sys.stdout.write("r")
    sys.stdout.flush()
    seen: set[tuple[int, float]] = set()
    while True:
        seen |= _descendants(driver) - before  # orphans are re-parented when the driver dies: learn them now
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not sys.stdin.buffer.read1(4096):
            break  # EOF: the driver closed the pipe or died
    _stop(seen)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
