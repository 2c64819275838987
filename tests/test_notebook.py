"""colab/keras_adamw_quickstart.ipynb runs top to bottom, offline.

The notebook runs in a Jupyter kernel (a process of its own, so it sets up
its own 4 logical CPU devices) with the repository root as its working
directory and this checkout on PYTHONPATH, so its install cell finds
keras_adamw and skips the install; the install cell's other branches run in
an IPython shell whose %pip only records its arguments.
"""

import importlib.machinery
import importlib.util
import os
import re

import jupyter_client.kernelspec
import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "keras_adamw_quickstart.ipynb")
CELL_TIMEOUT = 300


def read_notebook():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return nbformat.read(f, as_version=4)


@pytest.fixture(scope="module")
def python3_kernel(tmp_path_factory):
    """Makes sure a kernelspec named python3 exists, without network: the
    one ipykernel installs or provides natively, else one registered in a
    temporary directory."""
    if (
        "python3"
        in jupyter_client.kernelspec.KernelSpecManager().find_kernel_specs()
    ):
        yield "python3"
        return
    import ipykernel.kernelspec

    prefix = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.install(kernel_name="python3", prefix=str(prefix))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter")] + ([old] if old else [])
    )
    try:
        yield "python3"
    finally:
        if old is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="module")
def executed(python3_kernel):
    """The notebook after running it, and its outputs by cell tag."""
    notebook = read_notebook()
    env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow"
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=python3_kernel,
        resources={"metadata": {"path": ROOT}},
        allow_errors=False,
    )
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"A notebook cell failed:\n{str(error)[-5000:]}")
    cells = {}
    for cell in notebook.cells:
        for tag in cell.metadata.get("tags", []):
            cells[tag] = cell
    return notebook, cells


def stream_text(cell, name="stdout"):
    return "".join(
        output.get("text", "")
        for output in cell.outputs
        if output.output_type == "stream" and output.name == name
    )


def all_text(cell):
    """Stream outputs (stdout and stderr) and text/plain results."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "".join(parts)


def test_stored_notebook_is_valid_and_has_no_outputs():
    notebook = read_notebook()
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], cell.source[:80]
            assert cell.execution_count is None, cell.source[:80]


def install_cell():
    (cell,) = [
        c
        for c in read_notebook().cells
        if "install" in c.metadata.get("tags", [])
    ]
    return cell


def test_install_cell_has_no_placeholder_and_names_its_source():
    source = install_cell().source
    assert "<" not in source and "git+" not in source, source
    assert "checkout" in source and "PyPI" in source, source


@pytest.fixture
def shell_with_recorded_pip():
    """An IPython shell whose %pip only records its arguments."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    pip_calls = []
    shell.register_magic_function(pip_calls.append, "line", "pip")
    try:
        yield shell, pip_calls
    finally:
        InteractiveShell.clear_instance()


def _find_keras_adamw_as(monkeypatch, spec):
    """importlib.util.find_spec("keras_adamw") gives `spec` from now on."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: (
            spec if name == "keras_adamw" else find_spec(name, *args)
        ),
    )


def test_install_cell_does_nothing_when_keras_adamw_is_installed(
    shell_with_recorded_pip,
):
    shell, pip_calls = shell_with_recorded_pip
    assert shell.run_cell(install_cell().source).success
    assert pip_calls == []


@pytest.mark.parametrize("cwd", ["colab", "."])
def test_install_cell_installs_the_checkout_when_keras_adamw_is_missing(
    shell_with_recorded_pip, monkeypatch, cwd
):
    """From colab/ or the checkout's root: `%pip install` of the checkout
    (not the unrelated PyPI keras-adamw, not a URL)."""
    shell, pip_calls = shell_with_recorded_pip
    _find_keras_adamw_as(monkeypatch, None)
    monkeypatch.chdir(os.path.join(ROOT, cwd))
    assert shell.run_cell(install_cell().source).success
    (call,) = pip_calls
    assert call.split()[:2] == ["install", "-q"], call
    assert call.split()[-1].strip('"') == ROOT, call


def test_install_cell_replaces_the_unrelated_pypi_package(
    shell_with_recorded_pip, monkeypatch, tmp_path
):
    """A `keras_adamw` that is not this project (PyPI's keras-adamw 1.x)
    counts as missing."""
    shell, pip_calls = shell_with_recorded_pip
    other = tmp_path / "keras_adamw" / "__init__.py"
    other.parent.mkdir()
    other.write_text("")
    _find_keras_adamw_as(
        monkeypatch,
        importlib.machinery.ModuleSpec("keras_adamw", None, origin=str(other)),
    )
    monkeypatch.chdir(os.path.join(ROOT, "colab"))
    assert shell.run_cell(install_cell().source).success
    (call,) = pip_calls
    assert ROOT in call, call


def test_install_cell_outside_a_checkout_says_what_to_do(
    shell_with_recorded_pip, monkeypatch, tmp_path
):
    shell, pip_calls = shell_with_recorded_pip
    _find_keras_adamw_as(monkeypatch, None)
    monkeypatch.chdir(tmp_path)
    result = shell.run_cell(install_cell().source)
    assert isinstance(result.error_in_exec, RuntimeError)
    assert "colab/ folder" in str(result.error_in_exec)
    assert pip_calls == []


def test_no_cell_errors(executed):
    notebook, cells = executed
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, cell.source[:80]
            for output in cell.outputs:
                assert output.output_type != "error", (
                    cell.source[:80],
                    output.get("evalue"),
                )
    assert "already installed" in stream_text(cells["install"])
    assert "/device:CPU:3" in stream_text(cells["setup"])


@pytest.mark.parametrize("tag", ["fit-compare", "mirrored", "logger"])
def test_fit_cells_show_progress(executed, tag):
    text = all_text(executed[1][tag])
    assert "Epoch 1/" in text
    assert "loss" in text


def test_keras_adamw_adamw_lowers_the_loss_like_keras(executed):
    text = stream_text(executed[1]["fit-compare"])
    losses = {
        name: tuple(map(float, values))
        for name, *values in re.findall(
            r"^(\S+)\s+loss ([\d.]+) -> ([\d.]+)", text, re.M
        )
    }
    assert set(losses) == {
        "keras_adamw.AdamW",
        "keras_adamw.Adam",
        "keras.optimizers.AdamW",
    }, text
    start, end = losses["keras_adamw.AdamW"]
    assert end < 0.5 * start, text
    assert losses["keras_adamw.AdamW"] == pytest.approx(
        losses["keras.optimizers.AdamW"], rel=1e-3
    )
    difference = float(
        re.search(r"largest weight difference.*: (\S+)$", text, re.M).group(1)
    )
    assert difference < 1e-4, text


def test_custom_loop_trains(executed):
    text = stream_text(executed[1]["custom-loop"])
    losses = [float(v) for v in re.findall(r"mean loss ([\d.]+)", text)]
    assert len(losses) == 4 and losses[-1] < losses[0], text
    assert "optimizer steps: 128" in text


def test_mirrored_strategy_runs_on_two_replicas(executed):
    text = stream_text(executed[1]["mirrored"])
    assert "replicas in sync: 2" in text


def test_dtensor_cell_trains_and_shards_the_slots(executed):
    text = stream_text(executed[1]["dtensor"])
    first, last = map(
        float, re.search(r"DTensor loss ([\d.]+) -> ([\d.]+)", text).groups()
    )
    assert last < 0.8 * first, text
    # Slots take their variable's layout, sharded further along "batch".
    assert re.search(r"w1_0_momentum\s+\['batch', 'model'\]", text), text
    assert re.search(r"w2_0_velocity\s+\['model', 'batch'\]", text), text


def test_optimizer_logger_logs_learning_rate_and_weight_decay(executed):
    text = all_text(executed[1]["logger"])
    assert "learning_rate" in text and "effective_weight_decay" in text
    rates = [
        float(v)
        for v in re.search(r"^learning_rate:\s+\[(.*)\]$", text, re.M)
        .group(1)
        .replace("'", "")
        .split(",")
    ]
    assert len(rates) == 4 and rates[-1] < rates[0], text


def test_plot_cell_shows_an_image(executed):
    cell = executed[1]["plot"]
    assert any(
        "image/png" in output.get("data", {}) for output in cell.outputs
    ), [o.output_type for o in cell.outputs]
