"""`vae-serve` whose graphs answer from a cache: what the service costs with no inference at all.

    .venv/bin/python -m bench.profile --module bench.null_model --bundle runs/bench/bundle-30-epochs \
        --rpc Sample --per-request 1 --concurrency 32 --seconds 5 --out runs/bench/profile-null-1-c32

Each graph runs once per batch size; later calls of that size get a fresh copy of those outputs (a new
array, as onnxruntime returns), so gRPC, the batcher, the responses and the hand-offs between threads
all cost what they cost in the service, and the graphs nothing. Only for measuring: the images are
wrong for every request but the first of each size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from service import runtime
from service.__main__ import main

Outputs = Sequence[npt.NDArray[np.float32]]
_run_graph = runtime.GraphSession.run
_answers: dict[tuple[int, int], Outputs] = {}


def _cached_run(self: runtime.GraphSession, inputs: npt.NDArray[np.float32]) -> Outputs:
    key = (id(self), len(inputs))
    if key not in _answers:
        _answers[key] = [output.copy() for output in _run_graph(self, inputs)]
    return [output.copy() for output in _answers[key]]


if __name__ == "__main__":
    runtime.GraphSession.run = _cached_run  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
