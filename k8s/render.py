#!/usr/bin/env python3
"""``python k8s/render.py KIND [flags]`` is ``arc-dist k8s --kind KIND [flags]``.

The manifests and the renderer ship with the package (``arc_dist/k8s/``); this file keeps the
command that earlier docs give working from a source checkout.
"""

import sys

from arc_dist.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--kind", *argv]
    sys.exit(main(["k8s", *argv]))
