"""The glibc allocator tuning the crystalign command applies before any work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt exists on Linux only")


def _run(code: str, env_extra: dict[str, str] | None = None) -> str:
    # a fresh interpreter: the tuning is process-global and must not leak into the test process
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALIGN_NO_MALLOC_TUNING"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()


def test_applied_on_glibc():
    code = "from crystalign.settings import tune_allocator as t; print(t())"
    assert _run(code) == "True"


def test_opt_out_by_environment():
    code = "from crystalign.settings import tune_allocator as t; print(t())"
    assert _run(code, {"CRYSTALIGN_NO_MALLOC_TUNING": "1"}) == "False"


def test_torch_still_computes_after_tuning():
    code = (
        "import torch; from crystalign.settings import tune_allocator as t; t();"
        "a = torch.ones(3000, 3000, dtype=torch.float64); print(int(sum(float((a @ a).sum()) for _ in range(3))))"
    )
    assert _run(code) == str(3 * 3000**3)
