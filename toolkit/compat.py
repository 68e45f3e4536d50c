"""Workarounds for library behaviour we cannot change, each with its reason and a test that notices when it goes.

1. DeepSpeed 0.19 (ZeRO-3 partitioned parameters) calls `torch.distributed.all_gather_into_tensor`, which torch
   2.11+ marks deprecated: a FutureWarning is printed on every gather, flooding the log with lines the user cannot
   act on. We silence exactly that message. `tests/unit/test_compat.py` fails once torch stops warning (then delete
   this) and checks the filter does not hide other FutureWarnings.
"""

from __future__ import annotations

import warnings

ALL_GATHER_DEPRECATION = r".*all_gather_into_tensor.* is deprecated.*"


def silence_known_library_warnings() -> None:
    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATION, category=FutureWarning)
