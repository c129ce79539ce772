"""AWQ scaling groups, declared by each architecture as data.

A scaling group is a set of linears that read one input, and the op whose output that input
is. The pipeline searches one per-channel scale for the group, multiplies the linears' weight
columns by it and divides the previous op's output by it, so the float function stays the
same. Which groups exist is a fact of the architecture (where its norms sit, which linear
feeds which), so each block class states them in ``SCALING_GROUPS`` and the pipeline reads
them; the pipeline itself knows no architecture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingGroup:
    """One group: ``linears`` read ``capture_key``'s input, the output of ``previous``.

    ``capture_key`` names an input in the block's ``capture()`` result. ``previous`` is an
    attribute path inside the block: a norm (its 1-D ``weight`` multiplies its output) or a
    linear (its output rows); ``None`` when nothing can absorb a scale. A linear ``previous``
    whose outputs are fewer than the group's inputs (v_proj -> o_proj under grouped-query
    attention) is handled by the pipeline with tied scales.
    """

    name: str
    capture_key: str
    linears: tuple[str, ...]
    previous: str | None
