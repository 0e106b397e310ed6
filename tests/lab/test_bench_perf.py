"""``splitllm bench pipeline``, ``bench scaling``, ``bench http``, the 4g round and ``bench sessions``: what they
compute, and (slow, where processes start) one small run of each on a tiny model. Their timings are figures for the README, never asserted here."""

from __future__ import annotations

import mmap
import sys

import pytest

from shared.lab.bench.pipeline import bench_pipeline, link_floor
from shared.lab.bench.scaling import bench_scaling, link_seconds


def test_the_link_floor_is_the_bytes_up_the_last_gradient_down_and_one_round_trip() -> None:
    # 4g: 10 Mbit/s up, 30 down, 30 ms one way
    assert link_floor("4g", up_bytes=1.25e6, down_bytes=3.75e6, micro_batches=4) == pytest.approx(1 + 0.25 + 0.06)
    assert link_seconds("wifi", up=6.25e6, down=12.5e6) == pytest.approx(1 + 1)  # 50 up, 100 down
    assert link_seconds("none", up=1e9, down=1e9) == 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_bench_pipeline_runs_both_settings_with_the_same_rows(tiny) -> None:
    tiny("tiny-bert")
    r = bench_pipeline("tiny-bert", "1,1", batch_size=8, seq_len=32, micro_batches=4, steps=2, repeats=1,
                       codecs=("fp32",))
    row = r["codecs"]["fp32"]
    assert set(row["step_seconds"]) == {"1", "4"} and all(row["step_seconds"].values())
    one, four = row["bytes_per_step"][1], row["bytes_per_step"][4]
    # the same rows go up either way; 4 requests instead of 1 add only their headers
    assert one["up"] <= four["up"] < one["up"] * 1.2
    assert row["request_overhead"]["median_s"] > 0 and row["cpu_seconds_per_step"]["4"] > 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_bench_scaling_counts_every_users_samples(tiny) -> None:
    tiny("tiny-bert")
    r = bench_scaling("tiny-bert", "1,1", users=(1, 2), edges=2, profiles=("wifi",), micro_batches=2,
                      batch_size=4, seq_len=32, steps=2)
    rows = r["runs"]["wifi"]
    for n in ("1", "2"):
        for m in ("1", "2"):
            assert len(rows[n][m]["median_step_s"]) == int(n)
            assert rows[n][m]["samples_per_s"] > 0 and rows[n][m]["cpu_busy"] > 0
    assert rows["1"]["1"]["speedup_vs_1_user"] == pytest.approx(1)


@pytest.mark.parametrize("order", ["", "II", "HH", "IHX"])
def test_bench_http_refuses_an_order_without_both_paths(order: str) -> None:
    from shared.lab.bench.overhead import bench_http

    with pytest.raises(ValueError, match="at least one of each"):
        bench_http("tiny-llama", "1,3", order=order)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_bench_http_splits_each_path_into_the_tiers_compute_and_the_rest(tiny) -> None:
    from shared.lab.bench.overhead import bench_http, summary

    tiny("tiny-llama")
    r = bench_http("tiny-llama", "1,3", batch_size=2, seq_len=16, steps=3, order="IHHI")
    assert [len(steps) for steps in r["inprocess_steps"] + r["http_steps"]] == [3, 3, 3, 3]
    assert [x["path"] for x in r["rounds"]] == ["inprocess", "http", "http", "inprocess"]
    assert r["ratio"] == pytest.approx(r["http_step_seconds"] / r["inprocess_step_seconds"])
    assert set(r["round_counters"]["http_by_process"]) == {"cloud", "edge-0", "user-0"}
    for path in ("inprocess", "http"):
        assert set(r["compute_per_step"][path]) == {"user", "edge", "cloud"}
        assert all(seconds > 0 for seconds in r["compute_per_step"][path].values())
    assert set(r["outside_compute_per_step"]) == {"inprocess", "http"}
    assert "omp_wait_policy" in r and "outside the tiers' compute" in summary(r)
    for path in ("inprocess", "http"):
        counters = r["round_counters"][path]
        assert counters["user_s"] > 0 and counters["minor_faults"] > 0 and counters["system_s"] >= 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_bench_codecs_4g_records_each_processes_cpu_seconds(tiny) -> None:
    from shared.lab.bench.codecs import bench_codecs_4g

    tiny("tiny-bert")
    r = bench_codecs_4g("tiny-bert", "1,1", users=2, steps=2, batch_size=4, seq_len=32)
    for run in r["runs"].values():
        assert set(run["cpu_seconds"]) == {"cloud", "edge-0", "user-0", "user-1"}
        assert run["cpu_seconds_total"] == pytest.approx(sum(run["cpu_seconds"].values()))
        assert run["cpu_seconds"]["cloud"] > 0 and run["round_seconds"] > 0 and "load_before" in run["machine"]
        assert set(run["counters_by_process"]) == set(run["cpu_seconds"])
        assert run["counters_by_process"]["cloud"]["user_s"] + run["counters_by_process"]["cloud"]["system_s"] == \
            pytest.approx(run["cpu_seconds"]["cloud"])
    assert r["speedup_int8"] > 0


@pytest.mark.parametrize(("model", "tier", "head", "copies"),
                         [("tiny-llama", "cloud", True, 1), ("tiny-bert", "edge", False, 2)])
def test_bench_sessions_times_the_same_steps_one_after_the_other_and_at_once(tiny, model: str, tier: str,
                                                                             head: bool, copies: int) -> None:
    from shared.lab.bench.sessions import bench_sessions

    tiny(model)
    r = bench_sessions(model, "1,3", tier, sessions=3, batch_size=2, seq_len=16, steps=2, copies=copies)
    assert (r["head"], r["sessions"], r["steps_each"], r["task"]) == (head, 3, 2, "lm" if head else "cls")
    assert r["copies"] == copies and 0 < r["locked_share"] <= 1
    assert r["speedup_bound"] == pytest.approx(min(3, copies / r["locked_share"]))
    assert r["serial_s"] > 0 and r["concurrent_s"] > 0 and r["speedup"] == pytest.approx(r["serial_s"] / r["concurrent_s"])
    assert r["step_s_serial"] == pytest.approx(r["serial_s"] / 6) and "load_before" in r["machine"]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_process_counters_add_up_what_processes_used_since() -> None:
    from shared.lab.bench.timing import counters_since, process_counters

    # a fresh anonymous map, not malloc: after earlier tests freed large blocks, glibc may serve 8 MiB from pages
    # this process already faulted in (its mmap threshold grows with each freed map)
    block = mmap.mmap(-1, 8 << 20)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # with transparent huge pages always on, 2 MiB pages would fault 4 times
        block.madvise(mmap.MADV_NOHUGEPAGE)
    before = {"self": process_counters()}
    for offset in range(0, len(block), 4096):  # each page written: faulted in
        block[offset] = 1
    used = counters_since(before)
    block.close()
    assert used["minor_faults"] >= (8 << 20) // 4096 * 0.9 and used["user_s"] >= 0 and used["system_s"] >= 0
