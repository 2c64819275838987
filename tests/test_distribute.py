"""tf.distribute.MirroredStrategy over 2 and 4 logical CPU devices.

The checks run in subprocesses (tests/jobs/mirrored_job.py), one per device
count, since a process can hold MirroredStrategy objects of one size only.
Every distributed result is compared with an independent counterpart: the
same training on one device over the same global batches, or the float64
NumPy reference applied to the cross-replica sum of the gradients.
"""

import json

import pytest

from tests.jobs.processes import Processes


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    # Both sizes run at once: each process is mostly single-threaded
    # tracing, so two fit on the two cores.
    # Each in a folder of its own: the job keeps checkpoints beside --out.
    outs = {
        devices: tmp_path_factory.mktemp(f"mirrored{devices}") / "results.json"
        for devices in (2, 4)
    }
    with Processes(tmp_path_factory.mktemp("mirrored_logs")) as processes:
        for devices, out in outs.items():
            processes.start(
                f"mirrored{devices}",
                "mirrored_job",
                f"--devices={devices}",
                f"--out={out}",
                *(["--full"] if devices == 2 else []),
            )
        processes.finish(["mirrored2", "mirrored4"], timeout=900)
    return {
        devices: json.loads(out.read_text()) for devices, out in outs.items()
    }


@pytest.fixture(scope="module")
def two_devices(jobs):
    return jobs[2]


@pytest.fixture(scope="module")
def four_devices(jobs):
    return jobs[4]


FIT_CASES = ["amsgrad_ema", "everything", "everything_no_xla"]


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_on_two_devices_equals_one_device(two_devices, case):
    # Weights and every optimizer variable, on every device's copy; the
    # model has an Embedding whose ids repeat (sparse gradients).
    assert two_devices[f"fit/{case}"]["max_difference"] < 1e-5


def test_fit_on_four_devices_equals_one_device(four_devices):
    assert four_devices["fit/everything"]["max_difference"] < 1e-5


@pytest.mark.parametrize("case", ["plain", "everything"])
def test_custom_loop_building_in_first_step_equals_one_device(
    two_devices, four_devices, case
):
    assert two_devices[f"custom_loop/{case}"]["max_difference"] < 1e-5
    assert four_devices[f"custom_loop/{case}"]["max_difference"] < 1e-5


def test_keras_fails_to_build_in_first_step_under_the_strategy(two_devices):
    # The Keras 3 defect our custom-loop test above does not have.
    assert two_devices["keras_build_in_step"]["placeholder_error"]


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm", "clipvalue"])
def test_clipping_acts_on_the_cross_replica_sum(two_devices, clip):
    assert two_devices[f"clip_sum/{clip}"]["max_difference"] < 1e-12
    # Keras 3 clips each replica's gradient before summing.
    assert two_devices[f"keras_clip_sum/{clip}"]["max_difference"] > 1e-3


def test_global_clipnorm_on_four_devices(four_devices):
    assert four_devices["clip_sum/global_clipnorm"]["max_difference"] < 1e-12


@pytest.mark.parametrize("decay_mode", ["lr_scaled", "independent"])
def test_variable_rules_and_decay_schedule_on_two_devices(
    two_devices, decay_mode
):
    assert two_devices[f"rules/{decay_mode}"]["max_difference"] < 1e-12


@pytest.mark.parametrize("mode", ["aggregate_then_skip", "presummed_skip"])
def test_aggregate_gradients_and_skip_aggregation(two_devices, mode):
    assert two_devices[f"skip/{mode}"]["max_difference"] < 1e-12


def test_one_program_per_device(two_devices, four_devices):
    # Once per device (each has its own copies of the variables), not once
    # per variable: the XLA program traced with fused=False, the fused
    # kernel's call built into the train step by default on CPU; without
    # either nothing is traced.
    for results, devices in [(two_devices, 2), (four_devices, 4)]:
        assert results["fit/everything"]["kernel_traces"] == devices
        assert results["fit/everything"]["xla_traces"] == 0
        assert results["custom_loop/plain"]["xla_traces"] == devices
        assert results["custom_loop/plain"]["kernel_traces"] == 0
    assert two_devices["fit/everything_no_xla"]["xla_traces"] == 0
    assert two_devices["xla_vs_no_xla"]["max_difference"] < 1e-6


@pytest.mark.parametrize("direction", ["mirrored_to_one", "one_to_mirrored"])
def test_checkpoint_moves_between_mirrored_and_one_device(
    two_devices, direction
):
    case = two_devices[f"checkpoint/{direction}"]
    assert case["restored_iterations"] == 2
    assert case["max_difference"] < 1e-6


@pytest.fixture(scope="module")
def parameter_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ps")
    with Processes(tmp) as processes:
        processes.start("ps", "ps_job", f"--out={tmp / 'results.json'}")
        processes.finish(["ps"], timeout=300)
    return json.loads((tmp / "results.json").read_text())


def test_parameter_server_trains_without_xla_after_one_warning(
    parameter_server,
):
    assert parameter_server["variables_on_ps"]
    assert parameter_server["fallback_warnings"] == 1
    # No update lost: every scheduled step counted once.
    assert parameter_server["iterations"] == parameter_server["steps"]
    assert parameter_server["last_loss"] < 0.3 * parameter_server["first_loss"]


def test_keras_fit_cannot_train_under_parameter_server(parameter_server):
    # Keras 3's fit does not wrap datasets for a ClusterCoordinator.
    assert "create_per_worker_dataset" in parameter_server["keras_fit_error"]
