"""Committed documents name no path of the machine that produced them.

docs/RESULTS.md quotes the command lines of benchmark runs; they once showed the checkout they
ran in (``--json /work/main/bench/out/...``). The documents are checked as committed, and the
bench functions that record and render those commands are checked to write them relative to
the repository, whatever checkout, interpreter or working directory ran them.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DOCUMENTS = ("docs", "README.md", "openapi")
TEXT_SUFFIXES = {".md", ".json", ".rst", ".txt"}

#: An absolute path into a checkout, a home folder or root's home. Not after a word character,
#: ``.``, ``~`` or ``$`` (a URL's path, ``~/work``, ``$HOME/work``, a relative ``docs/work/``).
#: /tmp is left alone: the README names scratch and install folders of its commands there.
MACHINE_PATH = re.compile(r"(?<![\w.~$])/(?:work|root|home/[\w.-]+|Users/[\w.-]+)/")


def machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that name a machine path."""
    return [line.strip() for line in text.splitlines() if MACHINE_PATH.search(line)]


def test_the_pattern_finds_machine_paths_and_nothing_else() -> None:
    for line in ("Run: `python bench/quality.py --json /work/main/bench/out/q.json`", "--out /root/out/gpu.json",
                 "see /home/alice/metal-marlin/README.md", "(/Users/bob/src/x)", "`/work/main/.venv/bin/python`"):
        assert machine_paths(line) == [line], line
    for line in ("--json bench/out/q.json", "https://github.com/root/repo and https://example.com/home/user/x",
                 "~/work/x, $HOME/work/y, docs/work/z", "installs into `/tmp/site`", "--out $OUT/gpu-b.json"):
        assert machine_paths(line) == [], line


def tracked_documents() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "--", *DOCUMENTS], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout: {exc}")
    return [REPO / name for name in listed.splitlines() if Path(name).suffix in TEXT_SUFFIXES]


def test_committed_documents_name_no_machine_path() -> None:
    documents = tracked_documents()
    assert REPO / "docs" / "RESULTS.md" in documents and REPO / "README.md" in documents
    found = {str(p.relative_to(REPO)): hits for p in documents if p.is_file() and (hits := machine_paths(p.read_text(encoding="utf-8")))}
    assert not found, f"machine paths in committed documents (write them relative to the repository): {found}"


# ---------------------------------------------------------------------------------------
# The bench scripts record and render their commands relative to the repository
# ---------------------------------------------------------------------------------------
def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_paths_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch) -> tuple[ModuleType, ModuleType]:
    """``(bench/_machine.py, bench/results.py)``, loaded as the scripts load them (bench/ on the path)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return _load("_machine"), _load("results")


def test_recorded_command_is_relative_to_the_repository(bench, monkeypatch, tmp_path: Path) -> None:
    machine, _ = bench
    argv = [str(BENCH / "quality.py"), "--json", str(BENCH / "out" / "q.json"), "--salient-ratios", "", "--workdir=/scratch/x/w", "4:64"]
    command = machine.repo_command(argv)
    assert command == "python bench/quality.py --json bench/out/q.json --salient-ratios '' --workdir=<abs>/w 4:64"
    monkeypatch.chdir(BENCH)  # run from another folder: the script is still named from the root
    assert machine.repo_command(["quality.py", "--settings", "3:64"]) == "python bench/quality.py --settings 3:64"
    monkeypatch.chdir(tmp_path)
    assert machine.repo_command([str(BENCH / "gpu.py"), "--out", str(tmp_path / "gpu-a.json")]) == "python bench/gpu.py --out <abs>/gpu-a.json"


def test_rendered_commands_of_old_reports_lose_their_machine_paths(bench) -> None:
    machine, results = bench
    old = f"{REPO}/.venv/bin/python {REPO}/bench/quality.py --settings 3:64 --salient-ratios  --no-original --json {REPO}/bench/out/quality-3bit.json"
    shown = results.shown_command(old)
    assert shown == "python bench/quality.py --settings 3:64 --salient-ratios '' --no-original --json bench/out/quality-3bit.json"
    assert results.shown_command("python bench/serve.py ") == "python bench/serve.py"  # no phantom empty argument
    assert results.shown_command("python bench/gpu_kernels.py --out /root/out/gpu-kernels.json --rows 1") == "python bench/gpu_kernels.py --out $OUT/gpu-kernels.json --rows 1"
    assert results.shown_command("python bench/gpu.py --workdir <abs>/mmb --out <abs>/gpu-b.json") == "python bench/gpu.py --workdir <scratch>/mmb --out $OUT/gpu-b.json"
    new = machine.repo_command([str(BENCH / "quality.py"), "--salient-ratios", "", "--json", str(BENCH / "out" / "q.json")])
    assert results.shown_command(new) == new  # what is recorded now is shown as recorded
    line = results._provenance({"command": old, "started": "2026-11-27 05:55 UTC", "machine": "m"})
    assert f"`{shown}`" in line and not machine_paths(line) and str(REPO) not in line


def test_machine_line_names_the_blas_without_its_folder(bench, monkeypatch) -> None:
    pytest.importorskip("mlx.core")
    from metal_marlin import _blas

    machine, _ = bench
    monkeypatch.setattr(_blas, "loaded_blas", "/home/alice/lib/libopenblas.so.0")  # MM_BLAS_LIBRARY may be a path
    assert machine.describe_machine().endswith("MLX BLAS: libopenblas.so.0")
    monkeypatch.setattr(_blas, "loaded_blas", None)
    assert machine.describe_machine().endswith("MLX BLAS: bundled reference")
