"""``python -m arc_dist.launch``: the launcher (:mod:`arc_dist.elastic.launcher`) under its
short name, and :func:`main_entry` for training scripts (:mod:`arc_dist.elastic.worker`)."""

import sys

from .elastic.launcher import main
from .elastic.worker import main_entry

__all__ = ["main", "main_entry"]

if __name__ == "__main__":
    sys.exit(main())
