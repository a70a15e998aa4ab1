"""The per-layer benchmark's providers: :mod:`lorafuse.bench.providers` (in the package, so that
``lorafuse bench`` works from an installed wheel), under its historical name."""

import sys

from lorafuse.bench import providers

sys.modules[__name__] = providers
