"""``engine.decision.PostProcess``: the one reader and writer of a run's ``postprocess.json``."""

from __future__ import annotations

import json

import pytest

from engine.decision import PostProcess
from engine.metadata import TTA_MODES


def test_round_trip_keeps_every_recorded_field() -> None:
    post = PostProcess(thresholds=[0.4, 0.6], min_areas=[10, 20], tta="hflip", gate_thresholds=[0.3, 0.7],
                       images=12, kaggle_before=0.8, kaggle_after=0.9, scored_folds=[0, 1],
                       checkpoint_sha256=["ab", None], written_by="trainer evaluate --split oof")
    again = PostProcess.from_json(post.to_json(), "p.json")
    assert again == post
    assert "kaggle_after_gate" not in json.loads(post.to_json())  # never recorded: left out


def test_a_file_with_only_the_rule_reads_with_the_defaults() -> None:
    """What tools and older trainers wrote: the rule alone (no TTA was searched then)."""
    post = PostProcess.from_json('{"thresholds": [0.5], "min_areas": [7]}', "p.json").check(1, TTA_MODES, "p.json")
    assert (post.thresholds, post.min_areas, post.tta, post.gate_thresholds) == ([0.5], [7], "none", None)


@pytest.mark.parametrize(("text", "message"), [
    ('{"thresholds": [0.5]}', r"p.json: missing key\(s\) 'min_areas'"),
    ('{"thresholds": [0.5], "min_areas": [1], "treshold": 1}', r"p.json: unknown key\(s\) 'treshold'"),
    ("{not json", "p.json: not valid JSON"),
    ("[1, 2]", "p.json: expected a JSON object"),
    ('{"thresholds": 0.5, "min_areas": [1]}', "p.json: 'thresholds' must be a list"),
    ('{"thresholds": ["x"], "min_areas": [1]}', "p.json: thresholds must be numbers"),
])
def test_malformed_files_are_refused_naming_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PostProcess.from_json(text, "p.json")


def test_check_needs_one_value_per_class_and_a_known_tta() -> None:
    post = PostProcess(thresholds=[0.5, 0.5], min_areas=[1, 2, 3])
    with pytest.raises(ValueError, match=r"p.json: 'min_areas' must be a list of 2 values"):
        post.check(2, TTA_MODES, "p.json")
    with pytest.raises(ValueError, match=r"p.json: 'tta' must be one of none, hflip, hvflip, got 'spin'"):
        PostProcess(thresholds=[0.5], min_areas=[1], tta="spin").check(1, TTA_MODES, "p.json")
