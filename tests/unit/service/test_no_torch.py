"""The service and the client run without torch: importing them must not load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_importing_the_server_and_the_client_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import service.server, service.__main__, service.servicer, service.runtime, service.bundle\n"
        "import client, client.cli, client.encode_job, client.healthcheck\n"
        "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"torch was imported: {result.stdout}{result.stderr}"


def test_the_server_leaves_no_onnxruntime_telemetry_files_in_its_home(
    tmp_path: Path, vae_bundle: Path
) -> None:
    """onnxruntime writes ~/.cache/Microsoft/.../onnxruntime.db at import unless told not to: on a
    read-only root every start logged a failure, and a server should not record usage ids anyway."""
    code = (
        "import os\n"
        "os.environ.pop('ORT_DISABLE_TELEMETRY', None)\n"
        "import service.__main__, service.server\n"
        "from service.runtime import ort\n"
        "ort.InferenceSession(os.environ['DECODER'], providers=['CPUExecutionProvider'])\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "DECODER": str(vae_bundle / "decoder.onnx")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / ".cache").exists()
