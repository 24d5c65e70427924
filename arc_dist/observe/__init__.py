"""Observability, off the step path: the event log every rank writes
(:mod:`~arc_dist.observe.events`), the recorder that turns the controller's and the checkpoint
manager's events into records (:mod:`~arc_dist.observe.recorder`), metric exporters
(:mod:`~arc_dist.observe.metrics`) and ``arc-dist report`` (:mod:`~arc_dist.observe.report`)."""
