"""The per-layer benchmark's options: :mod:`lorafuse.bench.options` (in the package, so that
``lorafuse bench`` works from an installed wheel), under its historical name."""

import sys

from lorafuse.bench import options

sys.modules[__name__] = options
