"""Moved to :mod:`dsmoe.cli.distributed.options` (the application side of dsmoe.distributed); this
name is the same module."""
import sys

from ..cli.distributed import options as _module

sys.modules[__name__] = _module
