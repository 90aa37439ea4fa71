"""Runs the `dsmoe` command line with a fault injected, for tests/test_cli_faults.py.

    DSMOE_TEST_FAULT="<when>@<pattern>" python tests/fault_runner.py train ...

``pattern`` matches paths from the right, one ``*`` within one path part (``PurePath.match``:
``checkpoints/step-000004.tmp-*`` is that folder, not a file in it). ``when`` is one of
    half-write  safetensors.torch.save_file (or dsmoe.checkpoint's fsynced writer, which
                save_pretrained uses) to a path matching ``pattern`` writes half the file, then the
                process SIGKILLs itself (a kill -9 in the middle of writing)
    rename      os.replace whose source matches ``glob``: SIGKILL just before the rename
    renamed     the same, just after it
The first matching call triggers it; everything else runs as usual.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import PurePath


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    when, pattern = spec.split("@", 1)
    if when == "half-write":
        import safetensors.torch as st

        original = st.save_file

        def save_file(tensors, filename, metadata=None):
            if PurePath(filename).match(pattern):
                data = st.save(tensors, metadata=metadata)
                with open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _kill()
            return original(tensors, filename, metadata=metadata)

        st.save_file = save_file

        # model weights go through dsmoe.checkpoint's fsynced writer (save_pretrained)
        import dsmoe.checkpoint as dc

        original_write = dc._fsync_write

        def fsync_write(path, data):
            if PurePath(path).match(pattern):
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _kill()
            return original_write(path, data)

        dc._fsync_write = fsync_write
    elif when in ("rename", "renamed"):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            hit = PurePath(os.fspath(src)).match(pattern)
            if hit and when == "rename":
                _kill()
            result = original_replace(src, dst, *args, **kwargs)
            if hit:
                _kill()
            return result

        os.replace = replace
    else:
        raise SystemExit(f"fault_runner: unknown fault {when!r}")


if __name__ == "__main__":
    install(os.environ["DSMOE_TEST_FAULT"])
    from dsmoe.cli import main

    sys.exit(main(sys.argv[1:]))
