"""``server client`` (also ``camera stream``): simulated cameras streaming a folder of images to a
server, results as a Kaggle CSV.

The images are dealt round-robin to ``--streams`` cameras (``cam0``, ``cam1``...); each camera
opens one ``Inspect`` stream and sends its images as frames 0, 1, 2... (``--fps`` paces each
camera; 0 sends as fast as the server takes them). Encoded files are sent as they are (the server
decodes them); ``--raw`` reads them here as grayscale and sends raw GRAY8 frames instead.
``--line DIR`` streams a line folder instead (``trainer synth-line``, :mod:`coils.line_folder`):
one camera per camera id of its ``frames.csv``, each frame with its frame id, ``coil_id`` and
``position_mm``; the CSV's ``ImageId`` is then the frame's file, relative to the folder. Once every
frame of a coil is answered (over all cameras) the coil is ended with ``EndCoil`` (:mod:`client.coil_end`).

The CSV (``ImageId,ClassId,EncodedPixels``, the Severstal ``train.csv`` layout that
``trainer.data.read_annotations`` and ``trainer evaluate`` read) has one row per inspected image
and class, so defect-free images are listed too. ``EncodedPixels`` is the class's mask when the
server says the class is present (pixel count >= the model's minimum area) and empty otherwise:
the decision rule applied, as a Kaggle submission has it. Frames that failed are not in the CSV;
they are listed on stderr and make the exit status 1. Each camera is a :class:`client.camera.CameraStream`:
a server that drains, dies or restarts (or a balancer that moves the stream to another replica)
costs a reconnect and a resend, never an image; only a camera that gets no answer for
``--give-up`` seconds, or a status resending cannot mend, leaves images unanswered (listed, exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELP = "stream a folder of images to a server as concurrent cameras; write a Kaggle-format CSV"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


@dataclass
class FrameAnswer:
    """The server's answer for one image."""

    image_id: str
    camera_id: str
    frame_id: int
    response: Any  # inspection.v1.InspectResponse, None when the frame never reached a server
    latency_s: float
    local_error: str = ""  # why the camera answered it itself (too large to send)

    @property
    def ok(self) -> bool:
        return self.response is not None and not self.response.HasField("error")

    @property
    def error_message(self) -> str:
        if self.response is None:
            return self.local_error
        return self.response.error.message if self.response.HasField("error") else ""


@dataclass
class CameraRun:
    """What a client run got back.

    Attributes:
        answers: one per answered image, in (camera, frame) order.
        unanswered: ``(image_id, reason)`` for images the server never answered (its stream ended early).
        elapsed_s: wall time from the first frame sent to the last answer.
        coils_ended_s: from the last answer until every coil's EndCoil had returned.
    """

    answers: list[FrameAnswer] = field(default_factory=list)
    unanswered: list[tuple[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0
    model_info: Any = None  # inspection.v1.ModelInfo of the server
    counters: dict[str, Any] = field(default_factory=dict)  # camera id -> client.camera.CameraCounters
    coils: Any = None  # client.coil_end.CoilEnds when the frames carried coils
    coils_ended_s: float = 0.0

    @property
    def failed(self) -> list[FrameAnswer]:
        return [a for a in self.answers if not a.ok]

    def totals(self) -> Any:
        """Every camera's counters summed (a ``client.camera.CameraCounters``)."""
        from client.camera import CameraCounters

        total = CameraCounters()
        for counters in self.counters.values():
            for name, value in vars(counters).items():
                setattr(total, name, getattr(total, name) + value)
        return total


def list_images(folder: Path) -> list[Path]:
    """The JPEG/PNG files of ``folder`` (or of its ``train_images/``, a Severstal data folder), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    for candidate in (folder, folder / "train_images"):
        if candidate.is_dir():
            images = sorted(p for p in candidate.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if images:
                return images
    raise ValueError(f"--images {folder}: no .jpg/.jpeg/.png files in it (or in its train_images/)")


@dataclass(frozen=True)
class Shot:
    """One frame a camera sends: its id, image file and, on a line, its coil and strip position."""

    frame_id: int
    path: Path
    image_id: str
    coil_id: str = ""
    position_mm: float | None = None


def image_shots(images: Sequence[Path], streams: int) -> dict[str, list[Shot]]:
    """``images`` dealt round-robin to ``streams`` cameras ``cam0``, ``cam1``..., as frames 0, 1, 2..."""
    return {f"cam{i}": [Shot(n, path, path.name) for n, path in enumerate(images[i::streams])]
            for i in range(streams) if images[i::streams]}


def line_shots(line: Path) -> dict[str, list[Shot]]:
    """A line folder's frames (or those its ``frames.csv`` lists) per camera id, in file order.

    Raises:
        FileNotFoundError: no frames file, or a listed image that is missing.
        ValueError: a wrong row (the file and line named), or a camera's frame ids not increasing.
    """
    from coils.line_folder import frames_file, read_frames

    folder = frames_file(line).parent
    cameras: dict[str, list[Shot]] = {}
    for frame in read_frames(line):
        path = folder / frame.file
        if not path.is_file():
            raise FileNotFoundError(f"--line {line}: frame {frame.camera_id}/{frame.frame_id}: no such file {path}")
        shots = cameras.setdefault(frame.camera_id, [])
        if shots and frame.frame_id <= shots[-1].frame_id:
            raise ValueError(f"--line {line}: camera {frame.camera_id}: frame {frame.frame_id} is listed after frame "
                             f"{shots[-1].frame_id}; each camera's frame ids must increase down the file")
        shots.append(Shot(frame.frame_id, path, frame.file, frame.coil_id, frame.position_mm))
    if not cameras:
        raise ValueError(f"--line {line}: no frames listed")
    return cameras


def make_request(camera_id: str, frame_id: int, path: Path, raw: bool, coil_id: str = "",
                 position_mm: float | None = None) -> Any:
    """An ``InspectRequest`` carrying the file's bytes, or (``raw``) its GRAY8 pixels, and the frame's
    coil and strip position when it has them."""
    from protos.inspection.v1 import inspection_pb2 as pb

    request = pb.InspectRequest(camera_id=camera_id, frame_id=frame_id, captured_at_unix_ns=time.time_ns())
    if coil_id:
        request.coil_id = coil_id
        request.position_mm = position_mm
    if raw:
        import cv2

        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise ValueError(f"{path}: cannot be read as an image")
        request.raw_image.width, request.raw_image.height = gray.shape[1], gray.shape[0]
        request.raw_image.channels = 1
        request.raw_image.data = gray.tobytes()
    else:
        request.encoded_image = path.read_bytes()
    return request


def channel_credentials(tls_ca: Path | None) -> Any:
    import grpc

    if tls_ca is None:
        return None
    if not Path(tls_ca).is_file():
        raise FileNotFoundError(f"--tls-ca {tls_ca}: no such file")
    return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())


async def model_info(channel: Any, target: str, connect_timeout: float) -> Any:
    """Waits for the connection and asks the server what it serves.

    Raises:
        ConnectionError: the server cannot be reached in ``connect_timeout`` seconds, or does not serve yet.
    """
    import grpc

    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    try:
        async with asyncio.timeout(connect_timeout):
            await channel.channel_ready()
    except TimeoutError:
        raise ConnectionError(f"cannot reach an inspection server at {target} within {connect_timeout:g} s") from None
    try:
        return await pb_grpc.InspectionServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=connect_timeout)
    except grpc.aio.AioRpcError as exc:
        raise ConnectionError(f"{target}: {exc.code().name}: {exc.details()}") from None


async def run_cameras(
    target: str,
    images: Sequence[Path],
    streams: int = 4,
    fps: float = 0.0,
    raw: bool = False,
    credentials: Any = None,
    max_message_bytes: int | None = None,
    connect_timeout: float = 10.0,
    on_answer: Callable[[FrameAnswer], None] | None = None,
    give_up_s: float | None = 60.0,
    shots: dict[str, list[Shot]] | None = None,
    coil_lengths: dict[str, float | None] | None = None,
) -> CameraRun:
    """Streams ``images`` to ``target`` as ``streams`` concurrent cameras (:class:`client.camera.CameraStream`).

    A stream that breaks (a server draining or dying, a balancer switching replicas) reconnects and
    resends what was not answered; each image is answered exactly once.

    Args:
        credentials: ``grpc.ChannelCredentials`` for TLS, or None for plaintext.
        connect_timeout: seconds to wait for the server to answer at all.
        on_answer: called on the event loop for every answer (progress display).
        give_up_s: a camera whose stream gets no answer for this long stops (its images ``unanswered``).
        shots: camera id -> its frames (:func:`line_shots`), sent instead of ``images`` and ``streams``;
            each coil among them is ended (``EndCoil``) once all its frames are answered.
        coil_lengths: the length to end each coil with (:func:`client.coil_end.coil_lengths`).

    Raises:
        ConnectionError: the server cannot be reached or is not serving yet.
    """
    from client.camera import Backoff, open_channel
    from client.coil_end import CoilEnder

    if streams < 1:
        raise ValueError(f"--streams must be >= 1, got {streams}")
    if fps < 0:
        raise ValueError(f"--fps must be >= 0, got {fps}")
    cameras = shots if shots is not None else image_shots(list(images), streams)
    channel = open_channel(target, credentials, max_message_bytes)
    try:
        info = await model_info(channel, target, connect_timeout)
        log.info("server %s: model %s (%s %s on %s), frames %dx%d", target, info.model_version, info.backend,
                 info.precision, info.device, info.input_width, info.input_height)
        run = CameraRun(model_info=info)
        started = time.perf_counter()
        backoff = Backoff(give_up_s=give_up_s)
        per_coil = Counter(s.coil_id for frames in cameras.values() for s in frames if s.coil_id)
        ender = CoilEnder(channel, per_coil, coil_lengths or {}, give_up_s) if per_coil else None
        await asyncio.gather(*(_camera(channel, camera_id, frames, fps, raw, backoff, run, on_answer, ender)
                               for camera_id, frames in cameras.items()))
        run.elapsed_s = time.perf_counter() - started
        if ender is not None:
            run.coils = await ender.finish()
            run.coils_ended_s = time.perf_counter() - started - run.elapsed_s
    finally:
        await channel.close()
    run.answers.sort(key=lambda a: (a.camera_id, a.frame_id))
    return run


async def _camera(channel: Any, camera_id: str, shots: list[Shot], fps: float, raw: bool, backoff: Any,
                  run: CameraRun, on_answer: Callable[[FrameAnswer], None] | None, ender: Any = None) -> None:
    """One camera: sends its ``shots`` in order and collects their answers."""
    from client.camera import CameraStream, CameraStreamError

    by_id = {shot.frame_id: shot for shot in shots}
    async with CameraStream(channel, camera_id, backoff=backoff) as camera:
        async def produce() -> None:
            t0 = time.perf_counter()
            try:
                for n, shot in enumerate(shots):
                    if fps > 0 and (delay := t0 + n / fps - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    await camera.send(await asyncio.to_thread(make_request, camera_id, shot.frame_id, shot.path, raw,
                                                              shot.coil_id, shot.position_mm))
            except CameraStreamError:
                return  # answers() reports it
            finally:
                await camera.close()

        producer = asyncio.get_running_loop().create_task(produce())
        answered = 0
        try:
            async for answer in camera.answers():
                frame = FrameAnswer(by_id[answer.frame_id].image_id, camera_id, answer.frame_id, answer.response,
                                    answer.latency_s, answer.error)
                run.answers.append(frame)
                answered += 1
                if ender is not None:
                    ender.answered(by_id[answer.frame_id].coil_id)
                if on_answer is not None:
                    on_answer(frame)
        except CameraStreamError as exc:
            log.warning("camera=%s stopped after %d of %d frames: %s", camera_id, answered, len(shots), exc)
            run.unanswered.extend((by_id[i].image_id, str(exc)) for i in exc.unanswered)
            sent = set(exc.unanswered) | {a.frame_id for a in run.answers if a.camera_id == camera_id}
            run.unanswered.extend((s.image_id, "never sent: the stream had ended") for s in shots
                                  if s.frame_id not in sent)
        finally:
            if sys.exc_info()[0] is not None and not isinstance(sys.exc_info()[1], CameraStreamError):
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        run.counters[camera_id] = camera.counters


def write_predictions_csv(path: Path, answers: Sequence[FrameAnswer]) -> int:
    """Writes successful answers as ``ImageId,ClassId,EncodedPixels`` rows; returns the row count.

    One row per (image, class), sorted by image id; ``EncodedPixels`` is empty unless the class is present.
    """
    rows = []
    for answer in answers:
        if not answer.ok:
            continue
        for defect in answer.response.defects:
            rows.append((answer.image_id, defect.class_id, defect.rle if defect.present else ""))
    rows.sort(key=lambda r: (r[0], r[1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("ImageId", "ClassId", "EncodedPixels"))
        writer.writerows(rows)
    return len(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="server address HOST:PORT")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path,
                        help="folder of .jpg/.png images (or a Severstal data folder with train_images/)")
    source.add_argument("--line", type=Path, metavar="FILE_OR_FOLDER",
                        help="a line folder (trainer synth-line) or its frames.csv: one camera per camera id, each "
                        "frame sent with its coil_id and position_mm")
    parser.add_argument("--streams", type=int, default=4,
                        help="concurrent camera streams for --images (default: 4; --line: one per camera)")
    parser.add_argument("--fps", type=float, default=0.0, help="frames per second per camera; 0 = as fast as possible")
    parser.add_argument("--out", type=Path, default=Path("results.csv"), help="CSV to write (default: results.csv)")
    parser.add_argument("--raw", action="store_true", help="send raw GRAY8 pixels instead of the encoded files")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM root certificate: connect with TLS")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds to wait for the server (default: 10)")
    parser.add_argument("--give-up", type=float, default=60.0,
                        help="seconds a camera's frames wait without an answer (reconnecting, or connected to a "
                        "server that does not answer) before it stops and lists them (default: 60)")


def run(args: argparse.Namespace) -> int:
    from client.coil_end import coil_lengths
    from engine.cli_util import progress_bar

    shots = line_shots(args.line) if args.line is not None else None
    lengths = coil_lengths(args.line, shots) if shots is not None else None
    images = list_images(args.images) if shots is None else [s.path for frames in shots.values() for s in frames]
    streams = args.streams if shots is None else len(shots)
    credentials = channel_credentials(args.tls_ca)
    bar = progress_bar(total=len(images), unit="frame", desc="inspect", dynamic_ncols=True, file=sys.stderr)
    failed = 0
    latencies: list[float] = []

    def on_answer(answer: FrameAnswer) -> None:
        nonlocal failed
        failed += not answer.ok
        latencies.append(answer.latency_s)
        bar.update(1)
        if len(latencies) % 10 == 0 or len(latencies) == len(images):
            window = sorted(latencies[-200:])
            bar.set_postfix(errors=failed, p50_ms=f"{1000 * window[len(window) // 2]:.1f}", refresh=False)

    try:
        result = asyncio.run(run_cameras(args.target, images, streams, args.fps, args.raw, credentials,
                                         connect_timeout=args.connect_timeout, on_answer=on_answer,
                                         give_up_s=args.give_up, shots=shots, coil_lengths=lengths))
    finally:
        bar.close()
    rows = write_predictions_csv(args.out, result.answers)
    ok = len(result.answers) - len(result.failed)
    rate = len(result.answers) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    print(f"{ok} of {len(images)} frames inspected in {result.elapsed_s:.2f} s ({rate:.1f} frames/s) over "
          f"{streams} streams; {rows} rows written to {args.out}", file=sys.stderr)
    totals = result.totals()
    if totals.reconnects or totals.resent or totals.duplicates:
        print(f"  reconnects {totals.reconnects}, frames resent {totals.resent}, duplicate answers dropped "
              f"{totals.duplicates}", file=sys.stderr)
    for answer in result.failed:
        print(f"  failed {answer.image_id}: {answer.error_message}", file=sys.stderr)
    for image_id, reason in result.unanswered:
        print(f"  unanswered {image_id}: {reason}", file=sys.stderr)
    coils_failed = _report_coils(result.coils)
    return 1 if result.failed or result.unanswered or coils_failed else 0


def _report_coils(ends: Any) -> bool:
    """Prints the ended coils (and those that could not be ended); True when some could not."""
    if ends is None or ends.untracked:
        return False
    for coil_id, summary in sorted(ends.summaries.items()):
        defects = sum(c.defects for c in summary.classes)
        print(f"  coil {coil_id} ended: {summary.frames} frames, {defects} defects, {summary.length_mm / 1000:.3f} m",
              file=sys.stderr)
    for coil_id, reason in ends.failed:
        print(f"  coil {coil_id} not ended: {reason}", file=sys.stderr)
    return bool(ends.failed)
