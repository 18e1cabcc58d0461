"""`dualenc.data.manifest.default_split`: the one rule for the split searched, evaluated and
finally scored when none is named."""

from __future__ import annotations

import pytest

from dualenc.core.errors import DualEncError
from dualenc.data.manifest import Manifest, SplitSummary, default_split


def _manifest(**pairs: int) -> Manifest:
    return Manifest(splits={name: SplitSummary(count, count, count, (), {}) for name, count in pairs.items()})


@pytest.mark.parametrize("pairs, expected", [
    ({"train": 5, "val": 2, "test": 2}, "test"),
    ({"train": 5, "valid": 2}, "valid"),
    ({"train": 5, "validation": 2, "val": 2}, "val"),
    ({"test": 0, "train": 5, "val": 2}, "val"),  # an empty split is never chosen
    ({"train": 5, "other": 2}, "train"),  # none held out: the first, in manifest order
    ({"other": 2, "train": 5}, "other"),
])
def test_test_then_validation_names_then_the_first_split(pairs, expected):
    assert default_split(_manifest(**pairs), "data") == expected


def test_no_non_empty_split_is_one_line_naming_the_dataset():
    with pytest.raises(DualEncError, match=r"^packed dataset data/x has no non-empty split; re-pack the dataset$"):
        default_split(_manifest(train=0), "data/x")


def test_training_refuses_to_score_on_its_training_split(tmp_path):
    from dualenc.training.loop import scored_split

    assert scored_split(_manifest(train=5, val=2), tmp_path) == "val"
    with pytest.raises(DualEncError, match="no non-empty split among test, val, valid, validation"):
        scored_split(_manifest(train=5, other=2), tmp_path)
