"""``lorafuse sweep``: the papers' evaluation (LoRA pairs x prompts x methods x seeds, then subject /
style fidelity and text alignment per method) on one process or many, resumable.

Modules: :mod:`.spec` (the SPEC file and its checks), :mod:`.items` (work items, output folder),
:mod:`.runner` (generation and the multi-process run), :mod:`.scoring` (CLIP / DINO scores),
:mod:`.summary` (tables, contact sheets, trade-off plot). Importing this package imports nothing heavy.
"""

from .items import Item, make_items, pair_order
from .spec import Spec, SpecError, load_spec, parse_spec

__all__ = ["Item", "Spec", "SpecError", "load_spec", "make_items", "pair_order", "parse_spec"]
