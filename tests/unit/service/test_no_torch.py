"""The service and the client run without torch: importing them must not load it."""

from __future__ import annotations

import subprocess
import sys


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
