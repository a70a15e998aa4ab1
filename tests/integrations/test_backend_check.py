"""accelerate_fusion rejects an unknown kernel backend when it is called, not at the first pipe() call."""

import pytest

from lorafuse import accelerate_fusion


def test_unknown_backend_is_rejected_at_accelerate_fusion_time():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda-please'"):
        accelerate_fusion(object(), "subject", "style", "klora", backend="cuda-please")
