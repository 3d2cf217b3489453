"""The one range of temperatures the server scores at: requests, the configured default and the
completions endpoint all check against it.

Scoring multiplies float32 (or bf16) logits by 1/T. Below about 3e-39 that reciprocal is no
longer a finite float32 and every log-prob comes back NaN; well before that the tempered
distribution is one-hot at float32 precision, so nothing useful lies under `MIN_TEMPERATURE`.
Above `MAX_TEMPERATURE` (and certainly past float32's range, where 1/T rounds to 0) every
distribution is uniform; such a value is a unit mistake, not a sampling setting.
Pure: no torch, no pydantic.
"""

from __future__ import annotations

import math

MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6


def temperature_problem(value: float) -> str | None:
    """Why `value` cannot be a scoring temperature, or None when it can."""
    if not math.isfinite(value) or not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        return f"must be a number between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {value}"
    return None
