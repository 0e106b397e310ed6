"""``bench droppeft``'s memory probe: a step's saved bytes depend on its skip mask, not on its batch's length."""

from __future__ import annotations

from shared.lab.bench.droppeft import device_activation_bytes, parse_args
from shared.model.sources import resolve_model


def test_the_per_step_peak_is_measured_on_batches_of_one_shape(hermetic_cache) -> None:
    args = parse_args(["--quick", "--memory-steps", "6"])
    args.max_len = 64  # longer than most TREC questions: the rows of a batch, and the batches, differ in length
    blocks = resolve_model(args.model).num_layers  # tiny-bert: 4, all on the device
    out = device_activation_bytes(args, (blocks, blocks), [0.0, 0.5], personal=[])
    full, half = out["by_ratio"]["fixed"]["0.0"], out["by_ratio"]["fixed"]["0.5"]
    # rows padded to the longest in each batch would make the steps at ratio 0 differ; padded to --max-len
    # every step holds the same bytes, and the peak is a full step
    assert full["mean_bytes"] == full["peak_bytes"] and full["min_blocks_run"] == blocks
    # p = (0, 1/3, 2/3, 0.9) sums to 1.9: every step skips 1 or 2 blocks, so the peak falls by at least a block's bytes
    assert half["max_blocks_run"] <= blocks - 1 and half["min_blocks_run"] >= blocks - 2
    per_block = full["peak_bytes"] / blocks
    assert half["peak_bytes"] <= full["peak_bytes"] - 0.9 * per_block
