"""The command starts at once: `import crystalign.cli` imports no torch, pymatgen, lightning or potential, so --help,
`models`, `config list` and refused inputs answer in well under a second; errors share one one-line style; the
thread settings are chosen before torch starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from crystalign import settings
from crystalign.cli import app

HEAVY = ("torch", "pymatgen", "lightning", "sevenn", "chgnet", "mace", "ase", "scipy")
# generous: the strict part is which modules load; this only catches a heavy import that slipped in on a loaded
# CI machine (quiet, each of these takes ~0.3 s; importing torch alone takes 2-3 s)
WALL_LIMIT_S = 5.0


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # a fresh interpreter: this test process has imported everything already
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _cli(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "crystalign.cli", *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    return res, time.perf_counter() - t0


def test_importing_the_cli_and_the_package_imports_nothing_heavy():
    res = _python(
        f"""
        import sys
        import crystalign, crystalign.cli, crystalign.settings
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        assert not heavy, heavy
        print(sorted(m for m in sys.modules if m.startswith("crystalign.cli.")))
        """
    )
    assert res.returncode == 0, res.stderr
    assert "crystalign.cli.predict" in res.stdout  # every command module is in, and light


def test_lazy_names_of_the_package_still_resolve():
    res = _python(
        """
        import sys
        import crystalign
        assert "torch" not in sys.modules
        from crystalign import Generator
        assert crystalign.CrystalBatch.__name__ == "CrystalBatch" and Generator.__name__ == "Generator"
        assert {"CrystalBatch", "Generator", "predict"} <= set(dir(crystalign))
        """
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--help"], 0, "predict"),
        (["models"], 0, "perov_5"),
        (["config", "list"], 0, "rl_perov_5_velocity_cpu"),
        (["predict", "--threads", "0"], 2, "error: --threads must be between 1 and"),
        (["sample", "--model", "no_such_model", "--composition", "SrTiO3"], 2, "error: unknown model 'no_such_model'"),
        (["predict", "-n", "0"], 2, "error: -n must be a positive number"),
        (["predict", "--device", "gpu"], 2, "error: --device: invalid device 'gpu'"),
        (["train", "no_such_config.yaml"], 2, "error: no_such_config.yaml: config file not found"),
        (["rl", "sample", "no_such.pt", "-c", "SrTiO3"], 2, "error: checkpoint no_such.pt does not exist"),
        (["evaluate", "no_such_folder", "-r", "x.csv"], 2, "error: invalid value for "),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_answers_without_importing_torch(args, code, needle):
    """Answered in a subprocess within the wall-clock limit, and (strictly) without loading torch & co."""
    res, seconds = _cli(*args)
    assert res.returncode == code, res.stdout + res.stderr
    assert needle in res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "╭" not in res.stderr  # the one-line style, no rich box
    assert seconds < WALL_LIMIT_S, f"{args}: {seconds:.1f} s"
    check = _python(
        f"""
        import sys
        sys.argv = ["crystalign", *{args!r}]
        from crystalign.cli import main
        try:
            main()
        except SystemExit:
            pass
        heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
        assert not heavy, heavy
        """
    )
    assert check.returncode == 0, check.stderr[-2000:]


def test_evaluate_on_an_empty_folder_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path), "-r", str(tmp_path / "ref.csv"), "--no-progress"])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: {tmp_path}: no .cif files and no index.json"


@pytest.mark.parametrize(
    "args,start",
    [
        (["sample", "--model", "perov_5", "-n", "x"], "error: invalid value for '-n'"),
        (["predict", "--no-such-option"], "error: no such option: --no-such-option"),
        (["sample", "--composition", "SrTiO3"], "error: missing option '--model'"),
        (["hull", "build", "no_such.csv"], "error: invalid value for "),
    ],
)
def test_usage_errors_of_click_are_one_line_too(args, start):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), res.output
    assert f"(see `crystalign {args[0] if args[0] != 'hull' else 'hull build'} --help`)" in lines[0]


def test_a_bare_group_still_shows_its_help():
    res = CliRunner().invoke(app, ["rl"])
    assert "fit" in res.output and "sample" in res.output and "error" not in res.output


def test_predict_defaults_are_the_packages():
    from crystalign import prediction
    from crystalign.cli import predict as cli_predict

    assert (cli_predict.DEFAULT_COMPOSITION, cli_predict.DEFAULT_MODEL) == (prediction.DEFAULT_COMPOSITION, prediction.DEFAULT_MODEL)


def test_config_list_keys_are_the_config_classes():
    from crystalign.cli.config import RL_ONLY_KEYS, rl_only_keys

    assert RL_ONLY_KEYS == rl_only_keys()


def test_unknown_model_message_is_the_generators():
    from crystalign.generator import resolve_model

    res = CliRunner().invoke(app, ["sample", "--model", "no_such_model", "--composition", "SrTiO3"])
    with pytest.raises(FileNotFoundError) as err:
        resolve_model("no_such_model")
    assert res.output.strip() == f"error: {err.value}"


# ---------------------------------------------------------------------------------------------- threads


def _threads(code: str, env: dict) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in (*settings.THREAD_ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env={**clean, **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


REPORT = """
    import json, os, sys
    import crystalign.settings as s
    n = s.configure_threads({arg})
    import torch
    print(json.dumps({{"n": n, "torch": torch.get_num_threads(), "policy": os.environ.get("OMP_WAIT_POLICY"),
                      "spin": os.environ.get("GOMP_SPINCOUNT"),
                      **{{k: os.environ.get(k) for k in s.THREAD_ENV}}}}))
"""


def test_configure_threads_before_torch_sets_the_runtime():
    got = _threads(REPORT.format(arg="1"), {})
    assert got == {"n": 1, "torch": 1, "policy": "PASSIVE", "spin": settings.SPIN_COUNT, "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def test_the_users_environment_wins_over_the_default_and_an_explicit_count_over_both():
    got = _threads(REPORT.format(arg="None"), {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"})
    assert got["n"] == 1 and got["torch"] == 1 and got["MKL_NUM_THREADS"] == "1"
    assert got["policy"] == "ACTIVE" and got["spin"] is None  # the user's wait policy stands, no spin count over it
    if settings.usable_cpus() >= 2:
        got = _threads(REPORT.format(arg="2"), {"OMP_NUM_THREADS": "1"})
        assert got["n"] == 2 and got["torch"] == 2 and got["OMP_NUM_THREADS"] == "2"


def test_the_default_is_one_thread_per_free_core_less_a_spare_one(monkeypatch):
    def default(busy, cpus=4, quota=None):
        monkeypatch.setattr(settings, "_DEFAULT", [])
        monkeypatch.setattr(settings, "usable_cpus", lambda: cpus)
        monkeypatch.setattr(settings, "physical_cores", lambda cpus_=None: cpus)
        monkeypatch.setattr(settings, "cpu_quota", lambda: quota)
        monkeypatch.setattr(settings, "busy_cpus", lambda interval=0.05: busy)
        return settings.default_threads()

    assert default(0.1) == 3  # a quiet machine: one core stays for a busy process that may come
    assert default(1.0) == 2  # one other busy process
    assert default(6.0) == 1  # more than all: still one thread
    assert default(None) == 3  # no /proc/stat: every core but one
    assert default(0.0, quota=2.5) == 2  # a container limited to 2.5 CPUs of the 4
    assert default(0.0, cpus=2) == 1 and default(0.0, cpus=1) == 1


@pytest.mark.parametrize("bad", [0, -1, 10_000, 1.5, True])
def test_a_thread_count_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="threads must be between 1 and"):
        settings.configure_threads(bad)


def test_busy_cpus_is_a_share_of_the_usable_cpus():
    busy = settings.busy_cpus(0.02)
    assert busy is None or 0.0 <= busy <= settings.usable_cpus() + 1e-9


def test_sample_takes_threads_and_records_them(tmp_path, monkeypatch):
    import torch

    for key in (*settings.THREAD_ENV, "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # restored after the test
        monkeypatch.setenv(key, "1")
        monkeypatch.delenv(key)
    before = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["sample", "--model", "perov_5", "-c", "SrTiO3", "-n", "2", "--steps", "3",
                                       "--threads", "1", "--out", str(tmp_path / "s")])
        assert res.exit_code == 0, res.output
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["threads"] == 1
