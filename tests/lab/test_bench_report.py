"""``splitllm bench report``: the README's Performance section is what the committed bench files give, and the
section's verdicts and notes follow from the figures (on copies of those files with figures changed)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from shared.lab.bench.report import (
    BEGIN,
    END,
    RUNS,
    Report,
    load_results,
    main,
    saturation,
    splice,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "performance"


@pytest.fixture(scope="module")
def committed() -> dict:
    results = load_results(RESULTS)
    assert set(results) == {name for name, _ in RUNS}, "every bench the section reports has its file committed"
    return results


def test_readme_section_is_generated_from_the_committed_files() -> None:
    assert main(["--results", str(RESULTS), "--readme", str(ROOT / "README.md"), "--check"]) == 0


def test_check_fails_on_a_hand_edited_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "README.md").read_text()
    edited = tmp_path / "README.md"
    edited.write_text(text.replace("| 4g round, int8 against fp32", "| 4g round (edited), int8 against fp32", 1))
    assert edited.read_text() != text
    assert main(["--results", str(RESULTS), "--readme", str(edited), "--check"]) == 1
    assert "not what" in capsys.readouterr().err


def test_every_figure_names_its_command_and_every_command_is_the_bench_cli(committed: dict) -> None:
    section = Report(committed, "docs/performance").render({})
    for name, line in RUNS:
        assert line.startswith("splitllm ")
        assert name in section, name


def acceptance(results: dict) -> dict[str, list[str]]:
    rows = [line.split(" | ") for line in Report(results, "r").acceptance() if line.startswith("| ")][1:]
    return {cells[0].lstrip("| "): cells for cells in rows}


def test_verdicts_follow_the_figures(committed: dict) -> None:
    r = copy.deepcopy(committed)
    r["pipeline.json"]["codecs"]["fp32"]["ratio"], r["pipeline.json"]["codecs"]["int8"]["ratio"] = 0.59, 0.61
    for n, ratio in zip((1, 2, 3), (1.01, 1.2, 1.04)):
        r[f"http_{n}.json"]["ratio"] = ratio
    for n in (1, 2, 3):
        r[f"codecs_4g_{n}.json"]["round_4g"]["speedup_int8"] = 2.1
    r["compare.json"]["elapsed_s"] = 31 * 60
    rows = acceptance(r)
    pipe = next(v for k, v in rows.items() if k.startswith("pipelining"))
    assert "fp32 0.590x, int8 0.610x" in pipe[1] and pipe[2].startswith("in 1 of 2")
    http = next(v for k, v in rows.items() if k.startswith("HTTP"))
    assert http[1] == "1.010, 1.200, 1.040x" and http[2].startswith("in 2 of 3 runs")
    assert next(v for k, v in rows.items() if k.startswith("4g"))[2].startswith("yes")
    assert next(v for k, v in rows.items() if "under 30 minutes" in k)[2].startswith("no")
    # the user's memory holds only if its share holds over every run (its highest peak over the whole's lowest)
    for share, spread, holds in ((0.29, [0.27, 0.31], "no"), (0.29, [0.27, 0.295], "yes")):
        r["memory.json"]["user_rss_share"], r["memory.json"]["user_rss_share_range"] = share, spread
        memory = next(v for k, v in acceptance(r).items() if k.startswith("user tier's peak memory"))
        assert f"29.00% (probe, {spread[0]:.2%} to {spread[1]:.2%} over its runs)" in memory[1]
        assert memory[2].strip(" |") == holds


def test_a_missing_file_is_said_with_the_command_that_writes_it(committed: dict) -> None:
    r = {k: v for k, v in committed.items() if not k.startswith("http_") and k != "memory.json"}
    section = Report(r, "docs/performance").render({})
    assert "*Not measured: `http_1.json` is missing; `splitllm bench http --json docs/performance/http_1.json` " \
           "writes it.*" in section
    assert "`memory.json` is missing" in section
    assert not any(k.startswith(("HTTP", "user tier")) for k in acceptance(r))


def point(samples: float, busy: float, link: float, step: float) -> dict:
    return {"samples_per_s": samples, "cpu_busy": busy, "link_s_per_step": link, "median_step_s": {"user-0": step}}


def test_saturation_names_what_bound_it() -> None:
    cpu = [(1, point(8, 0.6, 0.7, 2.0)), (2, point(16, 1.5, 0.7, 2.0)), (4, point(24, 1.8, 0.7, 2.6)),
           (8, point(25, 1.9, 0.7, 5.0))]
    line = saturation("wifi", 1, cpu, 2)
    assert "gains under 10 % from 4 users to 8 (24.0 samples/s)" in line and "bound by the CPU" in line
    link = [(1, point(2, 0.2, 3.0, 3.2)), (2, point(2.1, 0.3, 3.0, 3.3))]
    assert "from 1 user to 2 " in saturation("4g", 1, link, 2) and "bound by the link" in saturation("4g", 1, link, 2)
    growing = [(1, point(2, 0.2, 0.1, 1.0)), (2, point(4, 0.4, 0.1, 1.0))]
    assert "grows to the last count measured" in saturation("none", 4, growing, 2)


def test_splice_replaces_only_between_the_markers() -> None:
    text = f"head\n{BEGIN}\nold\n{END}\ntail\n"
    assert splice(text, f"{BEGIN}\nnew\n{END}") == f"head\n{BEGIN}\nnew\n{END}\ntail\n"
    with pytest.raises(SystemExit, match="needs exactly one line"):
        splice("no markers here", "x")
    with pytest.raises(SystemExit, match="needs exactly one line"):
        splice(f"{END}\n{BEGIN}\n", "x")


def test_run_stops_at_a_failing_bench_and_leaves_the_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from shared.lab.bench import report

    monkeypatch.setattr(report, "RUNS", [("codec_speed.json", "splitllm bench no-such-bench --json {path}")])
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{BEGIN}\nold\n{END}\n")
    assert main(["--run", "--results", str(tmp_path / "r"), "--readme", str(readme)]) == 1
    assert "`splitllm bench no-such-bench" in capsys.readouterr().err
    assert readme.read_text() == f"x\n{BEGIN}\nold\n{END}\n"


def test_a_folder_without_the_files_or_with_a_broken_one_leaves_the_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{BEGIN}\nold\n{END}\n")
    assert main(["--results", str(tmp_path / "typo"), "--readme", str(readme)]) == 2
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "memory.json").write_text("{")
    with pytest.raises(SystemExit, match="memory.json is not a bench's JSON"):
        main(["--results", str(tmp_path / "r"), "--readme", str(readme)])
    assert readme.read_text() == f"x\n{BEGIN}\nold\n{END}\n"


def test_a_file_without_a_field_the_report_reads_is_named_and_the_readme_left(tmp_path: Path) -> None:
    import json

    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{BEGIN}\nold\n{END}\n")
    results = tmp_path / "r"
    results.mkdir()
    for name in ("scaling.json", "http_1.json"):
        (results / name).write_text((RESULTS / name).read_text())
    http = json.loads((results / "http_1.json").read_text())
    del http["round_counters"]  # as an older `bench http` wrote it
    (results / "http_1.json").write_text(json.dumps(http))
    said = r"http_1\.json: not the fields this report reads \(KeyError: 'round_counters'\)"
    with pytest.raises(SystemExit, match=said):
        main(["--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == f"x\n{BEGIN}\nold\n{END}\n"
    assert not (results / "scaling.png").exists(), "nothing is drawn before the section is whole"
