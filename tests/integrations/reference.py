"""Reference pipelines for the integration tests: PEFT's own forward driven by recorded gates."""

from lorafuse.integrations.replay import GateReplay  # noqa: F401  (re-exported for the tests)
