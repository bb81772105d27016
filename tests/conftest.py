"""Settings shared by every test run of this repository (not shipped; see conveyor.testing).

Hypothesis: no per-example deadline. Two tox envs and two xdist workers share two cores under
`make test`, so wall-clock deadlines would fail on load, not on bugs. Under CI the failing
example's reproduction blob is printed. HYPOTHESIS_PROFILE=dev gives fewer examples for quick
local runs.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("default", deadline=None)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)
