"""The codec measurement helper (shared.protocol.measure) and the codec bench built on it."""

from __future__ import annotations

import pytest
import torch

from shared.protocol.measure import measure

from codec_helpers import sample


def test_measure_reports() -> None:
    x = sample([4, 16, 64], torch.float32, 9)
    for spec in ("fp32", "fp16", "int8", "int4+shuffle-lz4", "topk:ratio=0.1"):
        r = measure(spec, x, repeats=2)
        assert set(r) >= {"codec", "bytes", "ratio_vs_fp32", "encode_decode_mb_s", "max_abs_err", "rel_err"}
        assert r["codec"] == spec and r["bytes"] > 0 and r["encode_decode_mb_s"] > 0
        assert r["ratio_vs_fp32"] == pytest.approx(x.numel() * 4 / r["bytes"])
    assert measure("fp32", x, 1)["max_abs_err"] == 0.0
    r8 = measure("int8", x, 1)
    assert 0 < r8["rel_err"] < 0.02 and r8["ratio_vs_fp32"] > 3
    assert measure("int4", x, 1)["rel_err"] > r8["rel_err"]


def test_bench_codecs_writes_the_report(hermetic_cache, tmp_path, capsys) -> None:
    """The bench's JSON has the fields the issue names, fp32 is the reference, and int8 saves bytes."""
    import json

    from shared.lab.cli import main
    from shared.model.sources import resolve_model

    out = tmp_path / "codecs.json"
    assert main(["bench", "codecs", "--model", "tiny-llama", "--split", "1,3", "--steps", "3", "--batch-size", "2",
                 "--seq-len", "16", "--seeds", "2", "--eval-examples", "4", "--codec", "int8", "--codec", "bf16",
                 "--no-4g", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "shakespeare" and report["seeds"] == [0, 1]
    rows = {r["codec"]: r for r in report["codecs"]}
    assert list(rows) == ["fp32", "int8", "bf16"]
    for r in rows.values():
        assert set(r) >= {"codec", "bytes_per_step", "ratio_vs_fp32", "encode_decode_mb_s", "loss_delta_pct",
                          "loss_delta_pct_se"}
        assert len(r["loss_delta_pct_per_seed"]) == len(r["train_loss_per_seed"]) == 2
    assert rows["fp32"]["loss_delta_pct"] == 0 and rows["fp32"]["ratio_vs_fp32"] == 1
    assert rows["int8"]["ratio_vs_fp32"] > rows["bf16"]["ratio_vs_fp32"] > 1.5  # tiny rows: headers weigh
    printed = capsys.readouterr().out
    assert "mean +- standard error" in printed and "one pass over the" in printed
    for r in rows.values():
        assert r["encode_decode_mb_s"] >= r["encode_decode_mb_s_median"] > 0  # best of the repeats, and their median
    passes = report["passes"]  # what one pass over the bench's tensor costs here: the floor under every codec
    hidden = resolve_model("tiny-llama").config.hidden_size
    assert passes["bytes"] == 2 * 16 * hidden * 4 and passes["cached_bytes"] == passes["bytes"]  # a small tensor
    assert all(passes[f"{op}_{where}_gb_s"] > 0 for op in ("copy", "multiply") for where in ("whole", "cached"))
