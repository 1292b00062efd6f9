"""`vae-serve` on uvloop's event loop instead of asyncio's, for the event-loop lever of the benchmark.

.venv/bin/python -m bench.serve_uvloop --model-dir BUNDLE ...   (the same flags as vae-serve)
"""

from __future__ import annotations

import sys

import uvloop

from service.__main__ import main

if __name__ == "__main__":
    # asyncio.run inside main() then builds a uvloop loop.
    uvloop.install()
    sys.exit(main())
