"""The shape of the code, as the architecture promises it:

- no private Keras name outside `keras_adamw/_keras_compat.py`, and no
  private tf_keras name outside `keras_adamw/tf_keras/_compat.py`;
- no DTensor (mesh or placement) branch in the core, and all DTensor code
  under `keras_adamw/dtensor/`;
- imports only run down the layers (the core never imports `dtensor`);
- no module over ~400 lines;
- `keras_adamw.dtensor` optimizers' configs are JSON and round-trip.
"""

import ast
import json
import pathlib

import keras
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import keras_adamw
from keras_adamw import _keras_compat

PACKAGE = pathlib.Path(keras_adamw.__file__).parent
# The checkout these tests are in (the package may be an installed wheel).
ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = sorted(p for p in PACKAGE.glob("*.py"))
ALL = sorted(PACKAGE.rglob("*.py"))

# Lower layers never import higher ones. A module may import any module of
# a lower layer (or its own layer where listed together below it).
LAYERS = [
    {"_tf_compat"},
    {
        "adam_math",
        "_keras_compat",
        "validation",
        "explain",
        "precision",
        "lazy_sparse",
        "kernels",
    },
    {"rules"},
    {"hyperparams", "step", "placement", "call_checks", "layerwise"},
    {"fused"},
    {
        "execution",
        "slots",
        "slot_paths",
        "state_io",
        "keras2_api",
        "step_inputs",
        "variable_rules",
        "learning_rate",
    },
    {"applying"},
    {"optimizers"},
    {"dtensor"},
    {"tf_keras"},
    {"callbacks", "demo"},
    {"__init__"},
]


# The two modules that may name private attributes: Keras 3's, and tf_keras'
# (`tf_keras/_compat.py`). Some names are the same in both (`_iterations`).
COMPAT_MODULES = ["_keras_compat.py", "_compat.py"]


def _layer(module):
    for depth, layer in enumerate(LAYERS):
        if module in layer:
            return depth
    raise AssertionError(f"module {module!r} is in no layer of the test")


def keras_private_names():
    """Private attributes of Keras' optimizer base class and variables (as
    built with every option the base class has)."""
    optimizer = keras.optimizers.Optimizer(
        learning_rate=0.1, use_ema=True, gradient_accumulation_steps=2
    )
    variable = keras.Variable([1.0])
    optimizer.build([variable])
    names = set(vars(optimizer)) | set(vars(variable))
    for obj in (optimizer, variable):
        names |= set(dir(obj))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def tf_keras_private_names():
    """Private attributes of tf_keras' optimizer base class (built with EMA
    and a schedule) and of its variables."""
    import tf_keras

    class Probe(tf_keras.optimizers.Optimizer):
        def build(self, var_list):
            super().build(var_list)

    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    optimizer = Probe(name="probe", use_ema=True)
    optimizer._learning_rate = optimizer._build_learning_rate(schedule)
    variable = tf.Variable([1.0])
    optimizer.build([variable])
    names = set(vars(optimizer)) | set(dir(optimizer)) | set(dir(variable))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def imported_names(node):
    """The module and names an import statement names ([] for others)."""
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
        return []
    return [getattr(node, "module", None) or ""] + [a.name for a in node.names]


def syntax_nodes(paths, skip=()):
    """`(path, node)` for every syntax node of `paths`, but files named in
    `skip`."""
    for path in paths:
        if path.name not in skip:
            for node in ast.walk(ast.parse(path.read_text())):
                yield path, node


def test_keras_private_names_are_only_in_the_compat_module():
    private = keras_private_names()
    assert {"_iterations", "_var_key", "_initialize"} <= private
    offenders = []
    for path, node in syntax_nodes(ALL, skip=COMPAT_MODULES):
        if isinstance(node, ast.Attribute) and node.attr in private:
            offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
        if any(n.startswith("keras.src") for n in imported_names(node)):
            offenders.append(f"{path.name}:{node.lineno} keras.src")
    assert not offenders, offenders


def test_tf_keras_private_names_are_only_in_its_compat_module():
    private = tf_keras_private_names()
    assert {"_index_dict", "_var_key", "_build_learning_rate"} <= private
    offenders = []
    for path, node in syntax_nodes(ALL, skip=COMPAT_MODULES):
        if isinstance(node, ast.Attribute) and node.attr in private:
            offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
        if any(n.startswith("tf_keras.src") for n in imported_names(node)):
            offenders.append(f"{path.name}:{node.lineno} tf_keras.src")
    assert not offenders, offenders


def test_private_tensorflow_modules_are_only_in_its_compat_module():
    private = ("tensorflow.python", "tensorflow.dtensor.python")
    offenders = [
        f"{path.name}:{node.lineno}"
        for path, node in syntax_nodes(ALL, skip={"_tf_compat.py"})
        if any(n.startswith(private) for n in imported_names(node))
    ]
    assert not offenders, offenders
    # The check sees such imports (also the ones inside functions).
    compat = PACKAGE / "_tf_compat.py"
    assert any(
        n.startswith(private)
        for _, node in syntax_nodes([compat])
        for n in imported_names(node)
    )


def test_the_compat_module_names_the_checked_versions():
    low, high = _keras_compat.SUPPORTED_KERAS
    assert _keras_compat.CHECKED_KERAS_VERSIONS[-1] == keras.__version__ or (
        _keras_compat._version_tuple(low)
        <= _keras_compat._version_tuple(keras.__version__)
        <= _keras_compat._version_tuple(high)
    )
    with pytest.raises(ImportError, match=f"Keras >= {low}"):
        _keras_compat.check_keras_version("3.0.0")
    with pytest.warns(UserWarning, match="checked with Keras"):
        _keras_compat.check_keras_version("9.0.0")


def test_core_has_no_dtensor_branch_or_import():
    """`placement.placement_for` is the one place that picks local or mesh;
    no other core module asks. (`_tf_compat` holds TensorFlow's private
    DTensor name for the `dtensor` subpackage, imported when called.)"""
    offenders = []
    for path, node in syntax_nodes(
        CORE, skip=["placement.py", "_tf_compat.py"]
    ):
        if any("dtensor" in n for n in imported_names(node)) and (
            path.name != "__init__.py"
        ):
            offenders.append(f"{path.name}:{node.lineno} import")
        if isinstance(node, (ast.If, ast.IfExp)):
            test = ast.unparse(node.test)
            if any(
                word in test.lower()
                for word in ("mesh", "placement", "dvariable", "dtensor")
            ):
                offenders.append(f"{path.name}:{node.lineno} {test}")
    assert not offenders, offenders


def test_imports_run_down_the_layers():
    offenders = []
    for path, node in syntax_nodes(ALL):
        # A subpackage (dtensor, tf_keras, kernels) is one module of the
        # layers.
        module = path.stem if path.parent == PACKAGE else path.parent.name
        imported = []
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module.startswith("keras_adamw"))
        ):
            if node.module == "keras_adamw":
                imported = [a.name for a in node.names]
            else:
                imported = [node.module.split(".")[1]]
        for name in imported:
            if name == module:
                continue
            if _layer(name) >= _layer(module):
                offenders.append(f"{path}: {module} imports {name}")
    assert not offenders, offenders


def test_no_module_is_much_over_400_lines():
    long = {
        p.name: n for p in ALL if (n := len(p.read_text().splitlines())) > 440
    }
    assert not long, long


def test_dtensor_config_is_json_and_round_trips():
    mesh = dtensor.create_mesh([("batch", 2), ("model", 2)], device_type="CPU")
    for cls in (keras_adamw.dtensor.Adam, keras_adamw.dtensor.AdamW):
        optimizer = cls(
            mesh, learning_rate=0.01, state_sharding_axis="batch", amsgrad=True
        )
        config = json.loads(json.dumps(optimizer.get_config()))
        assert config["state_sharding_axis"] == "batch"
        again = cls.from_config(config)
        assert again.mesh == mesh
        assert again._placement.state_sharding_axis == "batch"
        assert again.get_config() == optimizer.get_config()
        restored = keras.optimizers.deserialize(
            json.loads(json.dumps(keras.optimizers.serialize(optimizer)))
        )
        assert type(restored) is cls and restored.mesh == mesh
    # The core optimizer on a mesh keeps its mesh too.
    core = keras_adamw.AdamW(mesh=mesh)
    assert (
        keras_adamw.AdamW.from_config(
            json.loads(json.dumps(core.get_config()))
        ).mesh
        == mesh
    )


def test_setup_cfg_declares_the_supported_keras_that_ci_tests():
    text = (ROOT / "setup.cfg").read_text()
    assert (
        f"keras>={_keras_compat.SUPPORTED_KERAS[0].rsplit('.0', 1)[0]}" in text
    )
    assert (
        _keras_compat.CHECKED_KERAS_VERSIONS[0]
        == (_keras_compat.SUPPORTED_KERAS[0])
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "keras>=" in ci and "min_keras" in ci
