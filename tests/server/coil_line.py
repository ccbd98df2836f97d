"""A simulated coil whose defects a real inspection graph finds pixel for pixel, for the coil tests.

``trainer synth-line`` plants defects at known coil positions; :func:`paint_line` repaints every
frame so that a planted defect of class ``k`` is exactly the pixels at grey level :data:`GREY`
``[k]`` over a flat background (PNG: lossless). :func:`grey_bands_onnx` exports an inspection graph
(the real ``InspectionModel`` around a one-layer network, traced by the exporter's own code) whose
class ``k`` is the pixels within :data:`BAND` grey levels of ``GREY[k]``: its masks are the planted
masks exactly, so records can be compared with the truth within a pixel.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

BACKGROUND = 110
GREY = {1: 20, 2: 60, 3: 170, 4: 230}  # class id -> its defects' grey level
BAND = 15  # grey levels either side of a class's level that the model marks
SLOPE = 4000.0  # logit per unit of [0, 1] intensity: a hard step at each band's edge


def grey_bands_network():
    """``[N, 1, H, W]`` intensities in [0, 1] -> logits ``[N, 4, H, W]``: positive inside each class's band."""
    import torch
    from torch import nn

    class GreyBands(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            levels = torch.tensor([GREY[k] for k in sorted(GREY)], dtype=torch.float32) / 255.0
            self.register_buffer("low", (levels - BAND / 255.0).view(1, -1, 1, 1))
            self.register_buffer("high", (levels + BAND / 255.0).view(1, -1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return SLOPE * torch.minimum(x - self.low, self.high - x)

    return GreyBands().eval()


def grey_bands_onnx(out: Path, height: int, width: int) -> Path:
    """The inspection graph of :func:`grey_bands_network` for ``height`` x ``width`` frames (threshold
    0.5, minimum area 1: every marked pixel is answered, every class with one is present)."""
    import onnx

    from engine.metadata import ModelMetadata
    from network.inspection import InspectionModel
    from trainer.export import _serialise, _trace  # the exporter's own tracing and signature
    from trainer.synth import KINDS

    meta = ModelMetadata(num_classes=len(KINDS), class_names=list(KINDS), input_height=height, input_width=width,
                         train_height=height, train_width=width, thresholds=[0.5] * len(KINDS),
                         min_areas=[1] * len(KINDS), encoder="grey-bands", arch="unet", model_version="grey-bands-1")
    model = InspectionModel([grey_bands_network()], meta, with_probs=True).eval()  # _trace names probs too
    frames = np.full((1, height, width), BACKGROUND, np.uint8)
    graph = _trace(model, frames, meta, opset=17)
    out.write_bytes(_serialise(graph, with_probs=False))
    onnx.checker.check_model(str(out))
    return out


def paint_line(folder: Path) -> None:
    """Repaints every frame of a line folder from its true masks (``masks.csv``): background, and
    class ``k``'s pixels at ``GREY[k]``; the frames become PNG files in place."""
    from coils.line import load_line
    from coils.line_folder import LINE_FILE, read_frames, read_masks
    from engine import rle

    line = load_line(folder / LINE_FILE)
    masks = read_masks(folder)
    for frame in read_frames(folder):
        camera = line.camera(frame.camera_id)
        image = np.full((camera.frame_height_px, camera.frame_width_px), BACKGROUND, np.uint8)
        painted = np.zeros(image.shape, bool)
        for class_id, encoded in masks.get((frame.camera_id, frame.frame_id), {}).items():
            mask = rle.decode(encoded, *image.shape).astype(bool)
            assert not (painted & mask).any(), f"frame {frame.camera_id}/{frame.frame_id}: two classes share a pixel"
            image[mask] = GREY[class_id]
            painted |= mask
        path = folder / frame.file
        assert path.suffix == ".png", "paint_line needs a PNG line folder (lossless)"
        assert cv2.imwrite(str(path), image)


def make_coil_line(folder: Path, frames: int, cameras: int = 2, height: int = 32, width: int = 128,
                   seed: int = 0) -> dict:
    """A painted line folder of one coil (``trainer synth-line``'s plantings); returns its facts."""
    from trainer.synth_line import LineSpec, synthesize_line

    facts = synthesize_line(folder, LineSpec(cameras=cameras, frames=frames, height=height, width=width,
                                             overlap_px=16, image_format="png", seed=seed))
    paint_line(folder)
    return facts


def answered_records(line, answers, shots) -> list:
    """The records the test merges itself from the server's per-frame answers (their RLE masks)."""
    from coils.records import RecordBuilder
    from engine import rle

    builder = RecordBuilder(line)
    position = {(camera_id, s.frame_id): s for camera_id, frames in shots.items() for s in frames}
    for answer in answers:
        assert answer.ok, answer.error_message
        camera = line.camera(answer.camera_id)
        masks = np.stack([rle.decode(d.rle, camera.frame_height_px, camera.frame_width_px)
                          for d in answer.response.defects])
        shot = position[(answer.camera_id, answer.frame_id)]
        builder.add_frame(shot.coil_id, answer.camera_id, answer.frame_id, shot.position_mm, masks)
    return [r for coil in builder.coils() for r in builder.records(coil)]


def record_key(record) -> tuple:
    """What two runs' records must agree on (rounded: sums of areas may differ in the last bit)."""
    return (record.coil_id, record.class_id, round(record.along_start_mm, 6), round(record.along_end_mm, 6),
            round(record.across_start_mm, 6), round(record.across_end_mm, 6), round(record.area_mm2, 6),
            tuple(record.frames), tuple(record.cameras))
