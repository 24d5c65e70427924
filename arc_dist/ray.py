"""``import arc_dist.ray as arc_ray``: the Ray Train helpers of :mod:`arc_dist.integrations.ray`
under their short name (the same module object)."""

import sys

from .integrations import ray as _ray

sys.modules[__name__] = _ray
