"""Where a bench's figures came from: the machine, the libraries and the code that made them.

``write_json`` adds ``provenance()`` to every bench's file, so that a figure read months later (or sent by someone
else) says which CPU, which torch and which commit it measured; ``describe`` is the line the README's Performance
section prints from the files it reads.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
# CPU features that decide which of torch's kernels run (bf16 and int8 matmuls above all)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# what, changed or new and not committed, makes the code measured differ from the commit recorded (a bench's own
# files in docs/ are rewritten while ``make perf`` runs, and say nothing of the code)
CODE = ("*.py", "*.c", "pyproject.toml", "Makefile")


def cpu() -> dict[str, Any]:
    """The CPU's model name and which of ``FLAGS`` it has (Linux's /proc/cpuinfo; the platform's words elsewhere)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = set(found.get("flags", "").split())
    return {"cpu_model": found.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": [f for f in FLAGS if f in flags]}


def git(*args: str) -> str | None:
    """``git args`` in the repository's folder; None where git is missing or fails there."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip() if out.returncode == 0 else None  # a status line may begin with a space


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """The machine (CPU, cores, kernel), the libraries and the commit, with the code files changed since it (both
    None outside this repository's own git checkout)."""
    top = git("rev-parse", "--show-toplevel")  # this repository's own checkout, not one it was installed inside
    ours = top is not None and Path(top).resolve() == REPO
    commit = git("rev-parse", "HEAD") if ours else None
    changed = git("status", "--porcelain", "--untracked-files=all", "--", *CODE) if ours else None
    return {"written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **cpu(), "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": version("torch"), "transformers": version("transformers"), "commit": commit,
            "uncommitted": None if changed is None else [line[3:] for line in changed.splitlines()]}


def describe(results: dict[str, Any]) -> str:
    """One sentence on what the files in ``results`` (file name: its JSON) were measured on: each distinct machine
    with its libraries once, then each commit once, each with the files that say it when they do not all agree."""
    machines: dict[str, list[str]] = {}
    commits: dict[str, list[str]] = {}
    missing, times = [], []
    for name, report in results.items():
        p = report.get("provenance") if isinstance(report, dict) else None
        if not isinstance(p, dict):
            missing.append(name)
            continue
        flags = ", ".join(p.get("cpu_flags") or []) or "none of " + "/".join(FLAGS)
        machine = (f"{p.get('cpu_model')} ({p.get('cpus')} logical cores; {flags}), {p.get('system')}, "
                   f"Python {p.get('python')}, torch {p.get('torch')}, transformers {p.get('transformers')}")
        commit = f"commit {p['commit'][:10]}" if p.get("commit") else "no commit recorded"
        if p.get("uncommitted"):
            commit += f" with {len(p['uncommitted'])} code file(s) changed"
        machines.setdefault(machine, []).append(name)
        commits.setdefault(commit, []).append(name)
        times += [str(p["written_utc"])] if p.get("written_utc") else []
    times.sort()

    def listed(said: dict[str, list[str]]) -> str:
        return " and ".join(k if len(said) == 1 else f"{k} ({', '.join(files)})" for k, files in said.items())

    line = (f"Measured on {listed(machines)}; at {listed(commits)}"
            + (f"; written {times[0]} to {times[-1]}" if times else "") + "." if machines else "")
    if missing:
        line += (" The files do not record what they were measured on." if not machines else
                 f" These files do not record what they were measured on: {', '.join(missing)}.")
    return line.strip()


if __name__ == "__main__":
    import json

    json.dump(provenance(), sys.stdout, indent=2)
