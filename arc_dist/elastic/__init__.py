"""Surviving dead processes, hangs and lost nodes: the launcher around torchrun
(:mod:`~arc_dist.elastic.launcher`, ``python -m arc_dist.launch``) and its command line
(:mod:`~arc_dist.elastic.command`), the worker-side entry point that records why a process ended
(:func:`~arc_dist.elastic.worker.main_entry`), the exit-code protocol between them
(:mod:`~arc_dist.elastic.exitcodes`), and the warm-start zygote that forks workers with torch
imported (:mod:`~arc_dist.elastic.zygote`). Nothing here imports torch at import time, so the
launcher starts fast."""
