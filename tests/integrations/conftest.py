"""Quiet diffusers for the integration tests: its config deprecations, PEFT's expected warning when
a second adapter is loaded, and the alpha_pattern note of diffusers' own kohya loading (see the
per-layer alpha test in test_lora_files.py)."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="The following alpha_pattern keys did not match")
        yield
    dlog.set_verbosity(level)
