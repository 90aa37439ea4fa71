"""Moved to :mod:`dsmoe.cli.distributed.launch` (the application side of dsmoe.distributed); this
name is the same module."""
import sys

from ..cli.distributed import launch as _module

sys.modules[__name__] = _module
