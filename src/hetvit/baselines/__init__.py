"""Training-free token-reduction baselines to compare hetvit against: ToMe and EViT.

Both were written for hetvit from their papers' descriptions (no code of the authors' or
timm's repositories is used), and both work on a copy of a timm ``VisionTransformer``:

- :func:`tome`: token merging by bipartite soft matching in every block (Bolya et al.,
  ICLR 2023), with proportional attention and constant, decreasing or per-block schedules.
- :func:`evit`: top-k pruning by cls attention at a few blocks, the rest fused into one token
  (Liang et al., ICLR 2022).

The copy carries ``hetvit_baseline`` (the method and its settings); :func:`token_counts` gives
the tokens entering each block, :func:`formula_macs` the cost per image.
"""

from .common import (
    BaselineError,
    baseline_of,
    describe_baseline,
    formula_macs,
    is_baseline,
    selection_macs,
    token_counts,
)
from .evit import evit
from .tome import SCHEDULES, tome, tome_schedule

__all__ = ["tome", "evit", "token_counts", "formula_macs", "selection_macs", "tome_schedule",
           "BaselineError", "baseline_of", "is_baseline", "describe_baseline", "SCHEDULES",
           "METHODS"]

METHODS = ("tome", "evit")
