"""torchrun, with a failed rank reported in one line instead of torchrun's traceback.

    python -m megatron_t2i.cli.launch --standalone --nproc_per_node 2 pretrain.py ...

The arguments are torchrun's. When a rank fails, the rank has already said why (pretrain.py's
errors are one line each); torchrun would then print its own Python traceback and an error table
below it, burying that line. Here the launcher says which rank failed and exits with its code
(128 + N for a rank killed by signal N, as a shell does); a signal to the launcher itself (Ctrl-C)
is passed on to the ranks, which stop as they do (pretrain.py saves a checkpoint), and is one
line too.
"""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main(argv=None) -> int:
    try:
        torchrun(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = (f"exit code {code}; its own message is above" if code >= 0 else
               f"killed by signal {-code}, e.g. out of memory or from outside; it said nothing")
        print(f"launch: {e.name} failed on rank {rank} ({how})", file=sys.stderr)
        return code if code > 0 else 128 - code if code < 0 else 1
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the ranks were told too
        print(f"launch: stopped by signal {int(e.sigval)}; what the ranks did with it is above",
              file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
