"""No dualenc class overrides a private (underscore) method of a Keras or TensorFlow class.

Private methods change between Keras minor releases without notice; overriding one can break
`fit` on an upgrade. A dualenc class deriving from a Keras/TensorFlow class may add private
helpers of its own, but may not redefine one that a framework base class already has.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import keras

import dualenc

PACKAGE = Path(dualenc.__file__).parent
FRAMEWORKS = ("keras", "tensorflow", "tf_keras")


def private_overrides(cls: type) -> list[str]:
    """`Class._name` for each single-underscore attribute `cls` defines that a framework base also has."""
    framework_bases = [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] in FRAMEWORKS]
    return [
        f"{cls.__name__}.{name}"
        for name in vars(cls)
        if name.startswith("_") and not name.endswith("__")
        and any(name in vars(base) for base in framework_bases)
    ]


def dualenc_classes() -> list[type]:
    classes = []
    for module_info in pkgutil.walk_packages([str(PACKAGE)], prefix="dualenc."):
        module = importlib.import_module(module_info.name)
        classes += [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__]
    return classes


def test_no_private_keras_or_tensorflow_method_is_overridden():
    classes = dualenc_classes()
    assert any(issubclass(cls, keras.Model) for cls in classes), "the scan found no Keras model: it is broken"
    offenders = [override for cls in classes for override in private_overrides(cls)]
    assert offenders == [], f"private overrides under keras {keras.__version__}: {offenders}"


def test_the_scan_finds_a_private_override_but_not_a_private_helper():
    class Overriding(keras.Model):
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            pass

        def _own_helper(self):
            pass

    assert private_overrides(Overriding) == ["Overriding._maybe_symbolic_build"]
