"""Fails when the committed stubs in vae/v1/ differ from what proto/ generates now."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").rglob("*.proto"))


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-Iproto",
                *(f"--{kind}_out={out}" for kind in ("python", "grpc_python", "mypy", "mypy_grpc")),
                *PROTOS,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            # protoc finds the mypy plugins beside the running interpreter.
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        )
        generated = sorted(p.relative_to(out) for p in Path(out).rglob("*") if p.is_file())
        stale = [
            str(p)
            for p in generated
            if not filecmp.cmp(Path(out) / p, ROOT / p, shallow=False)
            if (ROOT / p).exists()
        ]
        missing = [str(p) for p in generated if not (ROOT / p).exists()]
    if stale or missing:
        print(f"generated stubs are out of date (stale: {stale}, missing: {missing}); run `make proto`")
        return 1
    print(f"stubs match proto/ ({len(generated)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
