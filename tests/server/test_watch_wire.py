"""The frames' wire to the line watch's process: a dense call of frames (two coils interleaved, probabilities or
none, masks packed where made or not, resends, a clean frame) comes back as the same frames, and the watch
makes the same records, finds, grades and alarms of them, in place and in its process."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest

from coils.alarms import parse_alarms
from coils.columns import ComponentColumns
from coils.line import Roll
from coils.records import FrameKey, masks_components
from coils.store import FrameComponents
from server.coil_watch import CoilWatch, WatchProcess, _SentStates
from server.watch_wire import WatchFrames
from tests.coils.test_records import ALONG, STRIP, frames_of, two_cameras
from tests.coils.test_verdict import PERIOD, roll_mark_frames
from tests.server.test_line_monitor import NAMES, RULES, grade


def dense_frames(line, coil_id: str, seed: int, probabilities: bool, classes=(1, 2)) -> list[FrameComponents]:
    """30 frames per camera of random pixels of ``classes``: tens of components a frame, many across frames."""
    rng = np.random.default_rng(seed)
    canvas = (rng.random((2, 30 * ALONG, STRIP)) < 0.06).astype(np.uint8)
    canvas[[k - 1 for k in (1, 2) if k not in classes]] = 0
    probs = rng.random(canvas.shape).astype(np.float32) if probabilities else None
    frames = []
    for n, (camera, frame_id, position, masks) in enumerate(frames_of(canvas, line)):
        key = FrameKey(coil_id, camera, frame_id)
        probability = None if probs is None else frames_of(probs, line)[n][3]
        found = masks_components(line, key, position, masks, probability)
        if not probabilities:  # as OpenCV's labelling makes them: no packed mask beside the mask
            found = [dataclasses.replace(c, mask_bits=None) for c in found]
        frames.append(FrameComponents(key, position, tuple(found), 2000.0 + n))
    return frames


@pytest.fixture(scope="module")
def line():
    return dataclasses.replace(two_cameras(), rolls=(Roll("work-roll", PERIOD / math.pi),))


@pytest.fixture(scope="module")
def call(line) -> list[FrameComponents]:
    first, second = dense_frames(line, "D1", 1, True, classes=(2,)), dense_frames(line, "D2", 2, False)
    marks = roll_mark_frames(line, "D1")  # a roll mark of class 1 on D1 besides, under frame ids of their own
    marks = [dataclasses.replace(f, key=dataclasses.replace(f.key, frame_id=f.key.frame_id + 100),
                                 components=tuple(dataclasses.replace(c, key=dataclasses.replace(
                                     c.key, frame_id=c.key.frame_id + 100)) for c in f.components)) for f in marks]
    clean = FrameComponents(FrameKey("D3", "cam0", 7), 140.0, (), 3000.0)
    mixed = [f for pair in zip(first, second) for f in pair] + marks
    # resends inside the call: one right after itself, others later
    return mixed[:5] + mixed[4:5] + [clean] + mixed[5:] + first[:3] + [clean]


def test_a_dense_call_comes_back_as_the_same_frames(call) -> None:
    assert sum(len(f.components) for f in call) / len(call) > 10
    wire = pickle.loads(pickle.dumps(WatchFrames.of(call), protocol=pickle.HIGHEST_PROTOCOL))
    back = wire.frames()
    assert len(wire) == len(back) == len(call) and sorted(wire.components) == ["D1", "D2"]
    for sent, came in zip(call, back):
        assert (came.key, came.position_mm, came.received_unix_s) == (sent.key, sent.position_mm, sent.received_unix_s)
        assert [c.to_dict() for c in came.components] == [c.to_dict() for c in sent.components]
        for part in came.components:
            assert part.key is came.key and "mask" not in vars(part)  # one key object; masks packed until read
    part, sent = back[0].components[3], call[0].components[3]
    assert np.array_equal(part.mask, sent.mask) and part.box_shape == sent.mask.shape
    assert any(c.max_probability is not None for c in back[0].components)


def test_the_watch_makes_the_same_records_of_the_wire_as_of_the_frames(line, call) -> None:
    rules = parse_alarms(RULES, NAMES)
    direct, wired = CoilWatch(line, rules, grade, budget=0), CoilWatch(line, rules, grade, budget=0)
    alarms = []
    for start in range(0, len(call), 50):  # several calls: each merges into what the coil has
        part = call[start:start + 50]
        expected = direct.work(part, [], 10.0 + start)
        assert wired.work(WatchFrames.of(part).frames(), [], 10.0 + start) == expected
        alarms += expected.alarms
    for coil_id in ("D1", "D2", "D3"):
        assert wired._coils[coil_id].builder.records(coil_id) == direct._coils[coil_id].builder.records(coil_id)
    assert len(direct._coils["D1"].builder.records("D1")) > 100
    assert [p.roll for p in expected.open_coils[0].periodic] == ["work-roll"]
    assert [a.rule for a in alarms] == ["roll-mark"]


def test_the_watch_process_answers_dense_calls_as_the_watch_in_place_does(line, call) -> None:
    """Frames as columns one way; the other way, an open coil's state only when it changed (else its id)."""
    rules = parse_alarms(RULES, NAMES)
    process, in_place = WatchProcess(line, rules, grade, budget=0), CoilWatch(line, rules, grade, budget=0)
    try:
        for n, part in enumerate((call[:60], [], call[60:], [], [])):  # no frames: the coils' states unchanged
            answer, expected = process.work(part, [], 5.0 + n), in_place.work(part, [], 5.0 + n)
            assert answer == expected
    finally:
        process.close()
    assert [c.coil_id for c in answer.open_coils] == ["D1", "D2", "D3"]
    sender, receiver = _SentStates(), _SentStates()
    first = receiver.unpack(pickle.loads(pickle.dumps(sender.pack(answer))))
    again = sender.pack(answer)
    assert again.open_coils == ("D1", "D2", "D3") and receiver.unpack(again) == first == answer


def test_a_packed_mask_of_the_wrong_size_is_refused_naming_the_component(call) -> None:
    columns = WatchFrames.of(call).components["D1"]
    masks = list(columns.packed_masks)
    masks[3] += b"\0"
    with pytest.raises(ValueError, match="component 3: a packed"):
        dataclasses.replace(columns, packed_masks=masks).packed_components()
    assert ComponentColumns.of("E", []).packed_components() == []
