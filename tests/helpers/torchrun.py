"""Launching `kdcache` commands as real processes: one plain process, or N under torchrun on loopback
with gloo, as a user would. Shared by the tests and bench/distributed.py."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # a parent's job is not the child's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, *, nproc: int = 1, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python COMMAND` (`-m MODULE ARGS` or `SCRIPT ARGS`) in `nproc` processes (torchrun when nproc > 1),
    each with one torch thread: two children on a 2-core machine would only contend with more."""
    child_env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    child_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "tests") + os.pathsep + ROOT, **(env or {})})
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return subprocess.run(launcher + list(command), env=child_env, capture_output=True, text=True, timeout=timeout)


def kdcache(args, *, nproc: int = 1, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`kdcache ARGS`, as `launch` runs it."""
    return launch(["-m", "kdcache", *args], nproc=nproc, env=env, timeout=timeout)
