"""The names of the two disjoint parts of the evaluated held-out tokens and of the unit they
are made of, shared by the evaluation that writes them (``evaluation.heldout_split``) and the
comparison that reads them (``analysis.compare``)."""

from __future__ import annotations

VALIDATION = "validation"
"""The part on which each architecture's settings are chosen."""
TEST = "test"
"""The part whose values are reported."""
PARTS = (VALIDATION, TEST)
"""Part index 0 and 1 (``evaluation.heldout_split.part_of_window``)."""
UNIT = "window"
"""What is assigned to a part and resampled: one stored window of held-out tokens."""
WINDOWS_KEY = "heldout_windows"
"""The key of ``metrics.json`` holding each part's per-window sums."""
STATISTICS = ("tokens", "sq_error", "variance", "l0_sum")
"""The per-window sums of each part (``evaluation.heldout_split``)."""
