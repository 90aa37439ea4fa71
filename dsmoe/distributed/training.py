"""Moved to :mod:`dsmoe.cli.distributed.training` (the application side of dsmoe.distributed); this
name is the same module."""
import sys

from ..cli.distributed import training as _module

sys.modules[__name__] = _module
