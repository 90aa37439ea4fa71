"""The application side of dsmoe.distributed: what `dsmoe train` does on several ranks.

``options`` (the ``--nproc`` / ``--ep`` options, joining a run, reading a distributed checkpoint's
training state), ``launch`` (torchrun for ``--nproc``), ``training`` (:class:`DistributedTraining`,
the training loop's distributed steps). The library they build on (process groups, the
all-to-all, expert parallelism, FSDP2, DCP checkpoints) is :mod:`dsmoe.distributed`.
"""
