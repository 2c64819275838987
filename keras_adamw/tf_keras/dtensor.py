"""`keras_adamw.tf_keras.dtensor`: Keras 2.9's DTensor optimizer signature.

`tf.keras.dtensor.experimental.optimizers.Adam(learning_rate, beta_1,
beta_2, epsilon, amsgrad, gradients_clip_option, ema_option, name, mesh)`
grouped the clip and EMA arguments into two small option objects. These
classes take that signature (an option may be such an object, a dict, or
`None`) and are `keras_adamw.tf_keras.Adam` / `AdamW` otherwise.

Example:

>>> import keras_adamw.tf_keras
>>> opt = keras_adamw.tf_keras.dtensor.AdamW(
...     mesh=mesh,
...     gradients_clip_option={"global_clipnorm": 1.0},
...     ema_option=keras_adamw.tf_keras.dtensor.EMAOption(use_ema=True))
>>> opt.global_clipnorm, opt.use_ema
(1.0, True)
"""

import collections

import tf_keras

from keras_adamw.tf_keras import optimizers

GradientsClipOption = collections.namedtuple(
    "GradientsClipOption",
    ["clipnorm", "clipvalue", "global_clipnorm"],
    defaults=(None, None, None),
)
GradientsClipOption.__doc__ = """Keras 2.9's clip options: at most one set."""

EMAOption = collections.namedtuple(
    "EMAOption",
    ["use_ema", "ema_momentum", "ema_overwrite_frequency"],
    defaults=(False, 0.99, None),
)
EMAOption.__doc__ = """Keras 2.9's EMA options (defaults: Adam's)."""


def option_values(option, option_class, argument):
    """The fields of `option` (an object with those attributes, a dict, or
    `None`) as a dict; missing fields take their defaults.

    Example:

    >>> option_values({"clipnorm": 1.0}, GradientsClipOption, "clip")
    {'clipnorm': 1.0, 'clipvalue': None, 'global_clipnorm': None}
    """
    if option is None:
        return option_class()._asdict()
    if isinstance(option, dict):
        unknown = sorted(set(option) - set(option_class._fields))
        if unknown:
            raise ValueError(
                f"Argument `{argument}` has unknown keys {unknown}; it takes "
                f"{list(option_class._fields)}. Received: "
                f"{argument}={option!r}"
            )
        return option_class(**option)._asdict()
    defaults = option_class._field_defaults
    if not any(hasattr(option, f) for f in option_class._fields):
        raise TypeError(
            f"Argument `{argument}` must be a {option_class.__name__}, a "
            f"dict with keys {list(option_class._fields)}, or None. "
            f"Received: {argument}={option!r}"
        )
    return {f: getattr(option, f, defaults[f]) for f in option_class._fields}


class _OptionSignature:
    """Takes the two option arguments; writes them back in `get_config`."""

    def __init__(self, gradients_clip_option=None, ema_option=None, **kwargs):
        super().__init__(
            **option_values(
                gradients_clip_option,
                GradientsClipOption,
                "gradients_clip_option",
            ),
            **option_values(ema_option, EMAOption, "ema_option"),
            **kwargs,
        )

    def get_config(self):
        """The config, the clip and EMA arguments as the two options.

        Example:

        >>> import keras_adamw.tf_keras
        >>> config = keras_adamw.tf_keras.dtensor.Adam().get_config()
        >>> sorted(config["ema_option"].items())
        [('ema_momentum', 0.99), ('ema_overwrite_frequency', None),
         ('use_ema', False)]
        """
        config = super().get_config()
        for name, option_class in (
            ("gradients_clip_option", GradientsClipOption),
            ("ema_option", EMAOption),
        ):
            config[name] = {f: config.pop(f) for f in option_class._fields}
        return config


@tf_keras.saving.register_keras_serializable(
    package="keras_adamw.tf_keras.dtensor"
)
class Adam(_OptionSignature, optimizers.Adam):
    """`keras_adamw.tf_keras.Adam` with Keras 2.9's DTensor signature.

    Args:
        learning_rate: See `keras_adamw.tf_keras.Adam`.
        beta_1: See `keras_adamw.tf_keras.Adam`.
        beta_2: See `keras_adamw.tf_keras.Adam`.
        epsilon: See `keras_adamw.tf_keras.Adam`.
        amsgrad: See `keras_adamw.tf_keras.Adam`.
        gradients_clip_option: A `GradientsClipOption`, an object with its
            fields, a dict of them, or `None`.
        ema_option: An `EMAOption`, an object with its fields, a dict of
            them, or `None`.
        name: Defaults to `"Adam"`.
        mesh: A `tf.experimental.dtensor.Mesh`, or `None`.

    Example:

    >>> import keras_adamw.tf_keras
    >>> opt = keras_adamw.tf_keras.dtensor.Adam(
    ...     learning_rate=1e-3, ema_option={"use_ema": True}, mesh=mesh)
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        gradients_clip_option=None,
        ema_option=None,
        name="Adam",
        mesh=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            gradients_clip_option=gradients_clip_option,
            ema_option=ema_option,
            name=name,
            mesh=mesh,
            **kwargs,
        )


@tf_keras.saving.register_keras_serializable(
    package="keras_adamw.tf_keras.dtensor"
)
class AdamW(_OptionSignature, optimizers.AdamW):
    """`keras_adamw.tf_keras.AdamW` with Keras 2.9's DTensor signature.

    Args:
        learning_rate: See `keras_adamw.tf_keras.AdamW`.
        weight_decay: Defaults to `0.004`.
        beta_1: See `keras_adamw.tf_keras.Adam`.
        beta_2: See `keras_adamw.tf_keras.Adam`.
        epsilon: See `keras_adamw.tf_keras.Adam`.
        amsgrad: See `keras_adamw.tf_keras.Adam`.
        gradients_clip_option: See `Adam`.
        ema_option: See `Adam`.
        name: Defaults to `"AdamW"`.
        mesh: A `tf.experimental.dtensor.Mesh`, or `None`.

    Example:

    >>> import keras_adamw.tf_keras
    >>> opt = keras_adamw.tf_keras.dtensor.AdamW(weight_decay=0.01)
    """

    def __init__(
        self,
        learning_rate=0.001,
        weight_decay=0.004,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        gradients_clip_option=None,
        ema_option=None,
        name="AdamW",
        mesh=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            gradients_clip_option=gradients_clip_option,
            ema_option=ema_option,
            name=name,
            mesh=mesh,
            **kwargs,
        )


__all__ = ["Adam", "AdamW", "EMAOption", "GradientsClipOption"]
