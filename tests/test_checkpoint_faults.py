"""Broken and failed checkpoints: a damaged newest checkpoint (a data file cut short, deleted or with one byte
changed, unreadable metadata) is named with what is wrong and the previous one is loaded; a save that fails part-way
(a rank's writes refused by the kernel, as on a full disk) leaves the previous checkpoints whole, removes its partial
folder, and stops the run or lets it go on (`on_save_error`). FSDP over 2 gloo ranks."""

from __future__ import annotations

import pytest
from fault_cases import broken_checkpoint_rank, full_disk_rank
from pool import get_pool

EXPECTED = {
    "truncate": r"has \d+ bytes; the metadata reads up to byte \d+",
    "delete": "is missing",
    "flip": r"has \d+ bytes of CRC32 [0-9a-f]{8}; it was written as \d+ bytes of CRC32 [0-9a-f]{8}",
    "metadata": r"\.metadata or \.manifest\.json unreadable",
}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_a_broken_newest_checkpoint_is_named_and_the_previous_one_loaded(tmp_path, how):
    import re

    for found, step, same, skipped, damaged in get_pool(2).run(broken_checkpoint_rank, str(tmp_path), how):
        assert found == 2 and step == 2 and same, (found, step, same)
        (path, problems), = skipped
        assert path.endswith("step-3") and any(re.search(EXPECTED[how], p) for p in problems), problems
        if damaged is not None and how != "metadata":
            assert any(p.startswith(damaged) for p in problems), (damaged, problems)


@pytest.mark.parametrize("on_save_error", ["stop", "continue"])
def test_a_save_that_fails_part_way_leaves_the_previous_checkpoints(tmp_path, on_save_error):
    for result, error, entries, step1_whole, saved3, steps in get_pool(2).run(full_disk_rank, str(tmp_path),
                                                                               on_save_error):
        assert step1_whole and "step-2.partial" not in entries and "step-2" not in entries, entries
        if on_save_error == "stop":
            assert result is None and "saving checkpoint" in error and "step-2 failed" in error, error
            assert "the previous checkpoints [1] are intact" in error and "--on-save-error continue" in error
        else:
            assert error is None and result is False and saved3 is True and steps == [1, 3], (result, saved3, steps)
