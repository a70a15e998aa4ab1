"""The public API is typed (``lorafuse/py.typed``): every parameter and return value of the entry points,
the handles' public methods and properties carry annotations, and they resolve at runtime
(``typing.get_type_hints``) without diffusers or PEFT being imported."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import lorafuse
from lorafuse.integrations import (
    FusionHandle,
    LoRAPair,
    ModuleFusion,
    accelerate_fusion,
    fix_peft_alphas,
    fuse_module,
    fuse_modules,
    load_lora_layers,
    load_lora_pair,
    remove_fusion,
)

FUNCTIONS = [accelerate_fusion, remove_fusion, fuse_module, fuse_modules, load_lora_pair, load_lora_layers,
             fix_peft_alphas]
HANDLES = [FusionHandle, ModuleFusion]


def public_members(cls):
    """(name, function) of the public methods and property getters a class defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__enter__", "__exit__"):
            continue
        if isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


def assert_fully_annotated(fn, what):
    hints = typing.get_type_hints(fn)  # raises NameError when an annotation does not resolve
    sig = inspect.signature(fn)
    missing = [p for p in sig.parameters if p not in ("self", "cls") and p not in hints]
    assert not missing, f"{what}: parameters without annotation: {missing}"
    assert "return" in hints, f"{what}: no return annotation"
    return hints


@pytest.mark.parametrize("fn", FUNCTIONS, ids=lambda f: f.__name__)
def test_entry_points_are_fully_annotated(fn):
    assert_fully_annotated(fn, fn.__name__)


@pytest.mark.parametrize("cls", HANDLES, ids=lambda c: c.__name__)
def test_handle_methods_and_properties_are_annotated(cls):
    members = dict(public_members(cls))
    assert members
    for name, fn in members.items():
        assert_fully_annotated(fn, f"{cls.__name__}.{name}")
    attrs = typing.get_type_hints(cls)  # the public attributes the class documents
    assert {"method", "backend"} <= set(attrs)


def test_the_types_say_what_the_functions_return():
    assert typing.get_type_hints(accelerate_fusion)["return"] is FusionHandle
    assert typing.get_type_hints(fuse_module)["return"] is ModuleFusion
    assert typing.get_type_hints(load_lora_pair)["return"] is LoRAPair
    assert typing.get_type_hints(remove_fusion)["return"] is bool
    hints = typing.get_type_hints(FusionHandle)
    assert hints["fallbacks"] == dict[str, int] and hints["calls"] is int
    assert typing.get_type_hints(FusionHandle.summary)["return"] == dict[str, typing.Any]
    pair = typing.get_type_hints(LoRAPair)["subject"]
    assert typing.get_origin(pair) is dict and typing.get_args(pair)[0] is str


def test_py_typed_ships_with_the_package():
    assert (Path(lorafuse.__file__).parent / "py.typed").is_file()
    setup = (Path(lorafuse.__file__).parent.parent / "setup.py").read_text()
    assert '"py.typed"' in setup


def test_hints_resolve_without_diffusers_or_peft():
    code = (
        "import sys, typing; from lorafuse.integrations import accelerate_fusion, FusionHandle, fuse_module, "
        "load_lora_pair; [typing.get_type_hints(f) for f in (accelerate_fusion, FusionHandle, fuse_module, "
        "load_lora_pair, FusionHandle.summary)]; "
        "assert 'diffusers' not in sys.modules and 'peft' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
