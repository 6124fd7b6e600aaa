"""`torchrun` that ends a failed run with the workers' own message, not the launcher's report.

    python -m dtllama.train.launch --standalone --nproc-per-node 2 recipes/train.py --tp 4

takes torchrun's arguments unchanged and runs them through torchrun's own `run`. When a worker fails,
torchrun prints a ~30-line `ChildFailedError` traceback and failure table after whatever the worker said;
the recipe already reports a user's mistake as one `error:` line from rank 0, so this launcher exits
with the failed worker's exit code and nothing more (`DTLLAMA_LAUNCH_DEBUG=1`: torchrun's report too).
A worker that crashed without a message of its own still gets one line naming its rank and exit code.
`run_recipe` is the recipes' side of that contract.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import torch.distributed as dist

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("DTLLAMA_LAUNCH_DEBUG") == "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner saying so
    if not debug:  # the agent logs each failed worker at ERROR level before raising
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        if debug:
            raise
        rank, failure = e.get_first_failure()
        if failure.exitcode not in (2, 3):  # the recipe's own one-line error (3: a collective's timeout), printed
            print(f"error: worker rank {rank} exited with code {failure.exitcode} (DTLLAMA_LAUNCH_DEBUG=1 shows "
                  "torchrun's report; the recipe's --debug shows worker tracebacks)", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def run_recipe(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """`main(argv)`, with the errors a user can fix printed as one line by rank 0 and exit code 2 (`--debug` in
    `argv`: raise them)."""
    from dtllama.train.watchdog import CollectiveTimeout

    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except CollectiveTimeout as e:  # every rank that waited says what for (the hung one may say nothing)
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        if "--debug" in argv:
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
