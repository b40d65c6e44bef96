"""Everything distributed: process-group init from torchrun / Slurm, FSDP2 wrapping, reductions, gather-with-grad.

Other modules receive ``rank`` / ``world_size`` (a :class:`DistInfo`) as arguments instead of querying globals.
"""

from internvl_tune.dist.env import DistInfo, barrier, init_distributed, shutdown
from internvl_tune.dist.gather import all_gather_object_ordered, all_reduce_sum, gather_with_grad

__all__ = [
    "DistInfo",
    "all_gather_object_ordered",
    "all_reduce_sum",
    "barrier",
    "gather_with_grad",
    "init_distributed",
    "shutdown",
]
