"""`vae-serve` with a process-level knob changed, for the server-side levers of the benchmark.

    .venv/bin/python -m bench.serve_variant [--uvloop] [--switch-interval-ms MS] VAE-SERVE-FLAGS

`--uvloop`: uvloop's event loop instead of asyncio's. `--switch-interval-ms`: how long a thread may
hold the GIL while another waits (Python's default is 5 ms); an inference thread back from
onnxruntime waits up to this long for the event loop's thread to let go.
"""

from __future__ import annotations

import sys

from service.__main__ import main


def cli(argv: list[str]) -> int:
    if "--switch-interval-ms" in argv:
        index = argv.index("--switch-interval-ms")
        sys.setswitchinterval(float(argv[index + 1]) / 1000)
        argv = argv[:index] + argv[index + 2 :]
    if "--uvloop" in argv:
        argv = [arg for arg in argv if arg != "--uvloop"]
        import uvloop

        # asyncio.run inside main() then builds a uvloop loop.
        uvloop.install()
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
