"""keras_adamw under MultiWorkerMirroredStrategy: two worker processes on
localhost, each running tests/jobs/multi_worker_job.py.

- Two workers end with the same weights and optimizer variables as each
  other and as one process (default strategy) trained on the same global
  batches: an independent run, not the workers compared with themselves.
- A lost worker loses nothing: worker 0 dies mid-epoch (`os._exit(1)`), the
  survivor's collectives fail, the test kills what is left and restarts both
  workers; `keras.callbacks.BackupAndRestore` resumes from the last epoch and
  the end state (weights and every optimizer variable: iterations, momentums,
  velocities, velocity_hats, EMA averages, gradient accumulators) equals the
  uninterrupted run.

Every process writes its output to a log file (no pipes to fill up), runs
under a deadline and is killed and reaped when its test ends, whatever
happened. Ports are fresh free ports on 127.0.0.1.

What Keras 3.15.1's BackupAndRestore does under MultiWorkerMirroredStrategy
(keras/src/callbacks/backup_and_restore.py):
- It has no notion of a chief: every worker saves `latest.weights.h5` and
  `training_metadata.json` into `backup_dir`. With one shared directory the
  workers collide (FileExistsError from its exists-then-makedirs, or h5py's
  "unable to lock file"), so each worker gets its own directory here. The
  workers' states are identical, so each restores its own copy.
- It restores only at epoch boundaries: `_load_model` reads the saved
  "epoch" and ignores the saved "batch", and a batch-level save
  (`save_freq=<int>`) records the epoch in progress. With `save_freq=2` a
  process killed after step 6 resumes at the start of epoch 1 with the
  state after step 6 and ends at 14 steps instead of 12. Hence
  `save_freq="epoch"`.
- Nothing makes the workers agree on which backup is the latest. Here they
  do because a worker cannot save epoch e before every worker has finished
  epoch e's steps: `fit` reads the loss metric (an all-reduce) between the
  last step and `on_epoch_end`. A worker lost while the others are writing
  their backups could still leave backups of different epochs.
"""

import json

import numpy as np
import pytest

from tests.jobs.processes import Processes
from tests.jobs.processes import free_ports
from tests.jobs.processes import job_env
from tests.jobs.processes import load_npz

JOB = "multi_worker_job"
DEADLINE = 240  # Seconds for one group of processes to finish.
SURVIVOR_GRACE = 60  # Seconds the survivor gets to fail on its own.
STEPS_PER_EPOCH = 4  # multi_worker_job.EXAMPLES // GLOBAL_BATCH
ACCUMULATION = 2  # multi_worker_job's gradient_accumulation_steps
EPOCHS = 3  # multi_worker_job.EPOCHS
# Epoch 1 (0-based), second batch: the last backup is from the end of epoch
# 0, and the survivor cannot reach the end of epoch 1 (it needs worker 0 for
# every step), so both workers' backups are of the same epoch.
CRASH_AT_STEP = STEPS_PER_EPOCH + 2


def tf_config(ports, index):
    return {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }


def start(processes, name, *flags, config=None):
    """Starts a job process, a worker of the cluster `config` if given."""
    env = job_env(
        **({} if config is None else {"TF_CONFIG": json.dumps(config)})
    )
    return processes.start(name, JOB, *flags, env=env)


def load(path):
    """The arrays an .npz from the job holds, and its events."""
    return load_npz(path, "events")


def assert_same_state(actual, expected, atol, what):
    """Every model weight and optimizer variable of `actual` is within
    `atol` of `expected` (the files name them by `optimizer_paths`).

    The tolerance shrinks with the array's scale below 1: velocities are
    about 1e-4, so 1e-5 absolute alone would allow a 10% error there.
    """
    (arrays, events), (reference, _) = actual, expected
    assert sorted(arrays) == sorted(reference), what
    paths = events["optimizer_paths"]
    for key in sorted(reference):
        name = key
        if key.startswith("optimizer_"):
            name = paths[int(key.split("_")[1])]
        scale = min(1.0, float(np.max(np.abs(reference[key]))))
        np.testing.assert_allclose(
            arrays[key],
            reference[key],
            rtol=0,
            atol=atol * scale,
            err_msg=f"{what}: {name} (tolerance {atol} x {scale:.3g})",
        )


def iterations(run):
    """The optimizer's step counter at the end of `run`."""
    arrays, events = run
    index = events["optimizer_paths"].index("adam_w/iteration")
    return int(arrays[f"optimizer_{index}"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two workers and one single process, all trained to the end, with the
    flags of the interrupted run below except the crash."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ports = free_ports(2)
    with Processes(tmp) as processes:
        for index in range(2):
            start(
                processes,
                f"worker{index}",
                "--multi_worker",
                f"--out={tmp / f'worker{index}.npz'}",
                f"--backup_dir={tmp / f'backup{index}'}",
                config=tf_config(ports, index),
            )
        start(
            processes,
            "single",
            f"--out={tmp / 'single.npz'}",
            f"--backup_dir={tmp / 'backup_single'}",
        )
        processes.finish(["worker0", "worker1", "single"], DEADLINE)
    return {
        name: load(tmp / f"{name}.npz")
        for name in ("worker0", "worker1", "single")
    }


def test_two_workers_equal_one_process_on_the_same_global_batches(
    uninterrupted,
):
    worker0, worker1, single = (
        uninterrupted[n] for n in ("worker0", "worker1", "single")
    )
    for run in (worker0, worker1, single):
        _, events = run
        assert events["epochs_run"] == list(range(EPOCHS))
        # One optimizer step per global batch, no more, no fewer.
        assert iterations(run) == EPOCHS * STEPS_PER_EPOCH
    assert [worker0[1]["task"], worker1[1]["task"]] == [0, 1]
    paths = worker0[1]["optimizer_paths"]
    assert sum(p.endswith("_velocity_hat") for p in paths) == 4
    assert sum(p.endswith("_gradient_accumulator") for p in paths) == 4
    assert sum(p.endswith("_average") for p in paths) == 4
    # No array is all zeros (which would compare equal however wrong),
    # except the gradient accumulators: zero after every real step, and
    # each epoch (4 calls) ends with one.
    for key, value in single[0].items():
        if key.startswith("optimizer_") and paths[
            int(key.split("_")[1])
        ].endswith("_gradient_accumulator"):
            continue
        assert np.max(np.abs(value)) > 1e-5, key
    assert_same_state(worker1, worker0, 1e-6, "worker 1 vs worker 0")
    assert_same_state(worker0, single, 1e-5, "two workers vs one process")


def test_lost_worker_resumes_from_backup_and_equals_uninterrupted(
    uninterrupted, tmp_path
):
    marker = tmp_path / "worker0_crashed"

    def flags(index, attempt):
        # One backup directory per worker: Keras 3's BackupAndRestore has no
        # notion of a chief, so with one shared directory both workers write
        # the same files at the same moment (FileExistsError from its
        # makedirs, or h5py's "unable to lock file").
        result = [
            "--multi_worker",
            f"--out={tmp_path / f'attempt{attempt}_worker{index}.npz'}",
            f"--backup_dir={tmp_path / f'backup{index}'}",
        ]
        if index == 0:
            result += [
                f"--crash_at_step={CRASH_AT_STEP}",
                f"--marker={marker}",
            ]
        return result

    with Processes(tmp_path) as processes:
        # Attempt 1: worker 0 dies after step CRASH_AT_STEP.
        ports = free_ports(2)
        for index in range(2):
            start(
                processes,
                f"attempt1_worker{index}",
                *flags(index, 1),
                config=tf_config(ports, index),
            )
        codes = processes.wait(["attempt1_worker0"], DEADLINE)
        assert codes["attempt1_worker0"] == 1 and marker.exists(), (
            f"worker 0 should have died at step {CRASH_AT_STEP}: {codes}\n"
            + processes.log("attempt1_worker0")
        )
        assert json.loads(marker.read_text())["epochs_run"] == [0, 1]
        # The survivor cannot finish: its next collective needs worker 0. It
        # fails on its own (UnavailableError, "Socket closed") or hangs; we
        # give it SURVIVOR_GRACE seconds, then kill it.
        survivor = processes.wait(["attempt1_worker1"], SURVIVOR_GRACE)
        assert survivor["attempt1_worker1"] != 0, processes.log(
            "attempt1_worker1"
        )
        processes.started["attempt1_worker1"].kill()
        processes.started["attempt1_worker1"].wait(timeout=30)
        assert not list(tmp_path.glob("attempt1_*.npz"))
        for index in range(2):
            metadata = json.loads(
                (
                    tmp_path / f"backup{index}" / "training_metadata.json"
                ).read_text()
            )
            assert metadata["epoch"] == 1, (index, metadata)

        # Attempt 2: both workers again, same flags, fresh ports.
        ports = free_ports(2)
        for index in range(2):
            start(
                processes,
                f"attempt2_worker{index}",
                *flags(index, 2),
                config=tf_config(ports, index),
            )
        processes.finish(["attempt2_worker0", "attempt2_worker1"], DEADLINE)

    resumed = [load(tmp_path / f"attempt2_worker{i}.npz") for i in range(2)]
    for run in resumed:
        _, events = run
        # Resumed from the backup of epoch 0: it started at epoch 1 with the
        # optimizer's state after STEPS_PER_EPOCH steps.
        assert events["first_epoch"] == 1, events
        assert events["epochs_run"] == list(range(1, EPOCHS)), events
        # optimizer.iterations counts real steps: one per ACCUMULATION calls.
        assert events["iterations_at_start"] == (
            STEPS_PER_EPOCH // ACCUMULATION
        ), events
        assert iterations(run) == EPOCHS * STEPS_PER_EPOCH
    assert_same_state(
        resumed[1], resumed[0], 1e-6, "resumed worker 1 vs resumed worker 0"
    )
    assert_same_state(
        resumed[0],
        uninterrupted["worker0"],
        1e-5,
        "resumed vs uninterrupted two workers",
    )
    assert_same_state(
        resumed[0],
        uninterrupted["single"],
        1e-5,
        "resumed vs uninterrupted one process",
    )
