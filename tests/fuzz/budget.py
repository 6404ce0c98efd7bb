"""How long the fuzzers run: one knob, ``HYPOTHESIS_PROFILE``, for every test in tests/fuzz.

- ``ci`` (the default): a few hundred examples per property, so the whole folder stays
  well under a minute on two cores.
- ``deep``: about seventeen times more, for a developer hunting bugs (minutes).

The settings are applied per test, never loaded as the global profile, so the other
Hypothesis tests of the suite keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_EXAMPLES = {"ci": 300, "deep": 5_000}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in _EXAMPLES:
    raise RuntimeError(f"HYPOTHESIS_PROFILE={PROFILE!r}: tests/fuzz knows {', '.join(_EXAMPLES)}")


def fuzz(scale: float = 1.0) -> settings:
    """Settings for one property: ``scale`` times the profile's example count."""
    return settings(max_examples=max(10, int(_EXAMPLES[PROFILE] * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    derandomize=PROFILE == "ci")
