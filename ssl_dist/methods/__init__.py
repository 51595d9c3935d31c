"""Pretraining methods: one file each, all behind the `Method` contract (`base.py`).

`resolve(name)` turns `method.name` into a Method class: a built-in name, or
`package.module:Class` for a method of the user's own.
"""

from __future__ import annotations

import importlib

from ssl_dist.methods.base import Method

# Built-in name -> "module:Class"; the names are also config.BUILTIN_METHODS.
BUILTIN = {
    "simclr": "ssl_dist.methods.simclr:SimCLR",
    "mocov3": "ssl_dist.methods.mocov3:MoCoV3",
    "rotnet": "ssl_dist.methods.rotnet:RotNet",
    "clip": "ssl_dist.methods.clip:CLIP",
    "siglip": "ssl_dist.methods.clip:SigLIP",
}

__all__ = ["BUILTIN", "Method", "MethodError", "resolve"]


class MethodError(ValueError):
    """`method.name` names no usable method; the message says what to set."""


def resolve(name: str) -> type[Method]:
    """The Method class that `method.name` names (imports its module). Driver and workers call it."""
    target = BUILTIN.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise MethodError(f"method.name={name!r}: allowed values are {', '.join(BUILTIN)}, or "
                          f"package.module:Class for a method of your own")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise MethodError(f"method.name={name!r}: module {module_name!r} does not import ({err}); "
                          f"check the name and that the module is on the Python path") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise MethodError(f"method.name={name!r}: {module_name} has no Method subclass {class_name!r}; "
                          f"subclass ssl_dist.methods.Method (see ssl_dist/methods/base.py)")
    return cls
