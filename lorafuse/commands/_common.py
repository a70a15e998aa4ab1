"""What every command shares: the one-line argument parser, usage errors, and the checks that run
before any model is loaded (output folder, device, optional dependencies, LoRA files).

Nothing here imports torch at module level: ``lorafuse --help`` must answer without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import struct
import sys
import tempfile
import warnings
from pathlib import Path

EXTRA_OF = {"diffusers": "diffusers", "transformers": "diffusers", "peft": "diffusers", "accelerate": "diffusers",
            "matplotlib": "plot"}


class UsageError(ValueError):
    """A problem with the command's inputs: printed as one line ``lorafuse <command>: <message>``,
    exit code 2. The message names the argument and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; option help wrapped at spaces only (never inside a path or a name)."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the usage block first) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (`{self.prog} --help` lists the options)\n")


def add_command(subparsers, name: str, summary: str, doc: str | None, main) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows ``summary`` and the module docstring ``doc`` as plain text."""
    p = subparsers.add_parser(name, help=summary, description=plain(doc or summary), formatter_class=HelpFormatter)
    p.set_defaults(main=main, command=name)
    return p


def plain(text: str) -> str:
    """A docstring as help text: RST markup (``code``, :mod:`x`, :func:`~a.b`) reduced to plain words."""
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "`").replace("\\\\", "\\").strip()


def fail(command: str, exc: BaseException) -> int:
    """Print one line for a user error and return exit code 2."""
    print(f"lorafuse {command}: {exc}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------ checks (before any model loads)
def require(*modules: str) -> None:
    """UsageError naming the extra to install when an optional dependency is missing (no import:
    ``find_spec`` only)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRA_OF.get(m, m) for m in missing})
        raise UsageError(f"needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                         + " and ".join(f'pip install "lorafuse[{e}]"' for e in extras))


def check_positive(value: int | None, arg: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{arg} must be at least 1, got {value}")


def check_out_dir(path: str | os.PathLike, arg: str = "--out") -> Path:
    """``path`` as a folder that exists and is writable (created if needed)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{arg} {str(path)!r}: exists and is not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        why = "a parent is a file" if isinstance(exc, (NotADirectoryError, FileExistsError)) else (
            exc.strerror or type(exc).__name__).lower()
        raise UsageError(f"{arg} {str(path)!r}: cannot write there ({why}); give a writable folder") from None
    return folder


_DEVICE = re.compile(r"(cpu|cuda)(:\d+)?")


def check_device_name(device: str | None, arg: str = "--device") -> None:
    """Refuse devices lorafuse does not run on (``gpu``, ``mps``, ...) without importing torch."""
    if device is not None and not _DEVICE.fullmatch(device):
        raise UsageError(f"{arg} {device!r}: not a device lorafuse runs on; use cpu or cuda (cuda:N for GPU N)")


def resolve_device(device: str | None, arg: str = "--device"):
    """The torch.device to run on (default: cuda when available), UsageError when it is not there."""
    import torch

    check_device_name(device, arg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{arg} {device}: this machine has no CUDA GPU (torch {torch.__version__}, built "
                             f"{'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{arg} {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ..)")
    return dev


def check_safetensors(path: str | os.PathLike, arg: str) -> None:
    """UsageError unless ``path`` is a readable safetensors file (header only: fast, no torch)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{arg} {str(path)!r}: no such file")
    if p.is_dir():
        raise UsageError(f"{arg} {str(path)!r}: is a folder; give a .safetensors file")
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header too long")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, struct.error) as exc:
        raise UsageError(f"{arg} {str(path)!r}: not a readable safetensors file ({exc})") from None


def quiet_libraries() -> None:
    """diffusers/transformers log config deprecations and optional-dependency notes on every build."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # loading / saving bars (the pipeline's own denoising bar is separate)
    tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # 2nd adapter: expected
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")  # diffusers' from_pretrained note
