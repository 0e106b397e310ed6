"""Every bench file says what it was measured on (``shared.lab.bench.provenance``), and the README's Performance
section says it once, or file by file where the files disagree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.lab.bench import provenance as prov
from shared.lab.bench.timing import write_json


def test_a_bench_file_records_the_cpu_the_libraries_and_the_commit(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "bench.json"
    write_json({"figure": 1.5}, str(path))
    written = json.loads(path.read_text())
    assert written["figure"] == 1.5
    p = written["provenance"]
    assert p["cpus"] >= 1 and p["cpu_model"] and p["python"].startswith("3.")
    assert p["torch"].startswith("2.") and p["transformers"]
    assert set(p["cpu_flags"]) <= set(prov.FLAGS)
    if p["commit"] is not None:  # a git checkout (a copy without .git records none)
        assert len(p["commit"]) == 40 and isinstance(p["uncommitted"], list)
    kept = {"figure": 2, "provenance": {"commit": "given"}}  # a report that says where it came from keeps it
    write_json(kept, str(path))
    assert json.loads(path.read_text())["provenance"] == {"commit": "given"}


def test_changed_code_is_listed_and_other_files_are_not(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_git(*args: str) -> str:
        calls.append(args)
        if args == ("rev-parse", "--show-toplevel"):
            return str(prov.REPO)
        return " M shared/x.py\n?? tools/new.py" if args[0] == "status" else "a" * 40

    monkeypatch.setattr(prov, "git", fake_git)
    p = prov.provenance()
    assert p["uncommitted"] == ["shared/x.py", "tools/new.py"]
    status = next(c for c in calls if c[0] == "status")
    assert status[-len(prov.CODE):] == prov.CODE  # only code: a bench's own JSON in docs/ is not a code change
    assert p["commit"] == "a" * 40
    monkeypatch.setattr(prov, "git", lambda *a: None)  # not a checkout, or no git
    assert prov.provenance()["commit"] is None and prov.provenance()["uncommitted"] is None
    # installed inside another project's checkout: that project's commit is not this code's
    monkeypatch.setattr(prov, "git", lambda *a: str(tmp_path) if a[-1] == "--show-toplevel" else "b" * 40)
    assert prov.provenance()["commit"] is None and prov.provenance()["uncommitted"] is None


def _p(**over: object) -> dict:
    base = {"written_utc": "2026-12-03T15:00:00Z", "cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512_bf16"],
            "cpus": 2, "system": "Linux 6.18", "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0",
            "commit": "3e66f4e91a001afbf8730c16a7b2bb070fdaa7c0", "uncommitted": []}
    return {"provenance": {**base, **over}}


def test_files_that_agree_are_described_once_with_the_span_they_were_written_in() -> None:
    line = prov.describe({"a.json": _p(), "b.json": _p(written_utc="2026-12-03T15:46:00Z")})
    assert line == ("Measured on AMD EPYC (2 logical cores; avx2, avx512_bf16), Linux 6.18, Python 3.11.7, torch "
                    "2.13.0+cpu, transformers 5.24.0; at commit 3e66f4e91a; written 2026-12-03T15:00:00Z to "
                    "2026-12-03T15:46:00Z.")


def test_files_that_disagree_or_say_nothing_are_named() -> None:
    line = prov.describe({"a.json": _p(), "b.json": _p(cpu_model="Intel Xeon", uncommitted=["shared/x.py"]),
                          "c.json": _p(commit=None), "old.json": {"figure": 1}})
    assert "AMD EPYC" in line and "transformers 5.24.0 (a.json, c.json)" in line
    assert "Intel Xeon" in line and "transformers 5.24.0 (b.json)" in line
    assert ("at commit 3e66f4e91a (a.json) and commit 3e66f4e91a with 1 code file(s) changed (b.json) and no commit "
            "recorded (c.json);") in line
    assert line.endswith("These files do not record what they were measured on: old.json.")
    # one machine, two commits: the machine is said once, without files
    line = prov.describe({"a.json": _p(), "b.json": _p(commit="b" * 40)})
    assert line.count("AMD EPYC") == 1 and "5.24.0; at commit 3e66f4e91a (a.json) and commit bbbbbbbbbb (b.json)" in line
    assert prov.describe({"old.json": {"figure": 1}}) == "The files do not record what they were measured on."


def test_a_real_checkouts_changed_code_is_named_exactly(tmp_path: Path, monkeypatch) -> None:
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git here")
    repo = tmp_path / "checkout"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "notes.md").write_text("words\n")
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    run("init", "-q")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", "one")
    (repo / "pkg" / "a.py").write_text("x = 2\n")  # a changed line's status begins with a space: " M pkg/a.py"
    (repo / "notes.md").write_text("more words\n")  # not code
    (repo / "pkg" / "b.py").write_text("y = 1\n")  # new code
    monkeypatch.setattr(prov, "REPO", repo.resolve())
    p = prov.provenance()
    assert len(p["commit"]) == 40
    assert sorted(p["uncommitted"]) == ["pkg/a.py", "pkg/b.py"]
