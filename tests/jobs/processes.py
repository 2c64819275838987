"""Helpers for tests that start job processes (tests/jobs/) on localhost.

Every process writes its output to a log file (no pipes to fill up), runs
under a deadline and is killed and reaped when its `Processes` block ends,
whatever happened.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
# What makes a process part of a cluster; a job starts without them unless
# its test sets them.
CLUSTER_VARIABLES = (
    "DTENSOR_JOBS",
    "DTENSOR_CLIENT_ID",
    "DTENSOR_NUM_CLIENTS",
    "DTENSOR_JOB_NAME",
    "TF_CONFIG",
)


def free_ports(count):
    """`count` distinct free ports on 127.0.0.1: bound together (so they
    differ), then released for the processes' gRPC servers."""
    sockets = [
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)
    ]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def job_env(**variables):
    """This process's environment for a job: quiet TensorFlow logs, the
    TensorFlow backend, no cluster variables, then `variables`."""
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow"
    )
    for name in CLUSTER_VARIABLES:
        env.pop(name, None)
    env.update(variables)
    return env


def load_npz(path, info_key):
    """The arrays of an .npz a job wrote, and its JSON entry `info_key`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != info_key}
        info = json.loads(str(data[info_key]))
    return arrays, info


class Processes:
    """Starts job processes, each logging to `log_dir/<name>.log`; on exit
    kills and reaps any still running."""

    def __init__(self, log_dir):
        self.log_dir = pathlib.Path(log_dir)
        self.started = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for process in self.started.values():
            if process.poll() is None:
                process.kill()
        for process in self.started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def start(self, name, job, *flags, env=None):
        """Runs `python -m tests.jobs.<job> <flags>` in the repository root,
        with `env` (default: `job_env()`)."""
        with open(self.log_dir / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", f"tests.jobs.{job}", *flags],
                cwd=ROOT,
                env=job_env() if env is None else env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started[name] = process
        return process

    def log(self, name):
        text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        return (
            f"--- {name} (last 3000 characters of its log) ---\n"
            + (text[-3000:])
        )

    def wait(self, names, timeout, stop_on_failure=False):
        """Waits until the processes `names` exit (or, with
        `stop_on_failure`, until one fails: a worker's peer cannot finish
        without it); returns their exit codes, None for one still running
        after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [self.started[n].poll() for n in names]
            if all(code is not None for code in codes):
                break
            if stop_on_failure and any(
                code not in (None, 0) for code in codes
            ):
                break
            time.sleep(0.2)
        return {n: self.started[n].poll() for n in names}

    def finish(self, names, timeout):
        """Waits for `names` and asserts they all exited with 0."""
        codes = self.wait(names, timeout, stop_on_failure=True)
        failed = [n for n in names if codes[n] != 0]
        assert not failed, (
            f"exit codes {codes} (None: still running after {timeout} s "
            "or when another failed)\n"
            + "\n".join(self.log(n) for n in failed)
        )
