from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RawImage(_message.Message):
    __slots__ = ("width", "height", "channels", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    channels: int
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("camera_id", "frame_id", "encoded_image", "raw_image", "captured_at_unix_ns", "coil_id", "position_mm")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    RAW_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    COIL_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_MM_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_id: int
    encoded_image: bytes
    raw_image: RawImage
    captured_at_unix_ns: int
    coil_id: str
    position_mm: float
    def __init__(self, camera_id: _Optional[str] = ..., frame_id: _Optional[int] = ..., encoded_image: _Optional[bytes] = ..., raw_image: _Optional[_Union[RawImage, _Mapping]] = ..., captured_at_unix_ns: _Optional[int] = ..., coil_id: _Optional[str] = ..., position_mm: _Optional[float] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class DefectResult(_message.Message):
    __slots__ = ("class_id", "present", "pixel_count", "rle")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    present: bool
    pixel_count: int
    rle: str
    def __init__(self, class_id: _Optional[int] = ..., present: _Optional[bool] = ..., pixel_count: _Optional[int] = ..., rle: _Optional[str] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("camera_id", "frame_id", "error", "defects", "model_version", "timings")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DEFECTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_id: int
    error: FrameError
    defects: _containers.RepeatedCompositeFieldContainer[DefectResult]
    model_version: str
    timings: Timings
    def __init__(self, camera_id: _Optional[str] = ..., frame_id: _Optional[int] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., defects: _Optional[_Iterable[_Union[DefectResult, _Mapping]]] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_us", "inference_us", "postprocess_us", "total_us", "decode_us", "batch_size")
    QUEUE_US_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_US_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    DECODE_US_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_us: int
    inference_us: int
    postprocess_us: int
    total_us: int
    decode_us: int
    batch_size: int
    def __init__(self, queue_us: _Optional[int] = ..., inference_us: _Optional[int] = ..., postprocess_us: _Optional[int] = ..., total_us: _Optional[int] = ..., decode_us: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DefectClass(_message.Message):
    __slots__ = ("class_id", "name")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    name: str
    def __init__(self, class_id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("classes", "input_height", "input_width", "thresholds", "min_areas", "backend", "precision", "model_version", "device", "max_batch", "folds", "encoder", "project_version", "backend_selection")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MIN_AREAS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    FOLDS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    PROJECT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_SELECTION_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[DefectClass]
    input_height: int
    input_width: int
    thresholds: _containers.RepeatedScalarFieldContainer[float]
    min_areas: _containers.RepeatedScalarFieldContainer[int]
    backend: str
    precision: str
    model_version: str
    device: str
    max_batch: int
    folds: int
    encoder: str
    project_version: str
    backend_selection: str
    def __init__(self, classes: _Optional[_Iterable[_Union[DefectClass, _Mapping]]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., thresholds: _Optional[_Iterable[float]] = ..., min_areas: _Optional[_Iterable[int]] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., model_version: _Optional[str] = ..., device: _Optional[str] = ..., max_batch: _Optional[int] = ..., folds: _Optional[int] = ..., encoder: _Optional[str] = ..., project_version: _Optional[str] = ..., backend_selection: _Optional[str] = ...) -> None: ...

class GetLineStatusRequest(_message.Message):
    __slots__ = ("camera_id",)
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    def __init__(self, camera_id: _Optional[str] = ...) -> None: ...

class DriftScore(_message.Message):
    __slots__ = ("statistic", "psi", "ks", "psi_over_threshold", "ks_over_threshold")
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_FIELD_NUMBER: _ClassVar[int]
    PSI_OVER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KS_OVER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    statistic: str
    psi: float
    ks: float
    psi_over_threshold: bool
    ks_over_threshold: bool
    def __init__(self, statistic: _Optional[str] = ..., psi: _Optional[float] = ..., ks: _Optional[float] = ..., psi_over_threshold: _Optional[bool] = ..., ks_over_threshold: _Optional[bool] = ...) -> None: ...

class CameraDrift(_message.Message):
    __slots__ = ("camera_id", "frames_seen", "window_fill", "scored", "scores", "over_threshold")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SEEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FILL_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OVER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frames_seen: int
    window_fill: int
    scored: bool
    scores: _containers.RepeatedCompositeFieldContainer[DriftScore]
    over_threshold: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, camera_id: _Optional[str] = ..., frames_seen: _Optional[int] = ..., window_fill: _Optional[int] = ..., scored: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[DriftScore, _Mapping]]] = ..., over_threshold: _Optional[_Iterable[str]] = ...) -> None: ...

class CaptureStatus(_message.Message):
    __slots__ = ("enabled", "directory", "policy", "offered", "selected", "written", "skipped_queue_full", "skipped_quota", "skipped_error", "bytes_used", "quota_bytes", "queued")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    OFFERED_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_QUEUE_FULL_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_QUOTA_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    directory: str
    policy: str
    offered: int
    selected: int
    written: int
    skipped_queue_full: int
    skipped_quota: int
    skipped_error: int
    bytes_used: int
    quota_bytes: int
    queued: int
    def __init__(self, enabled: _Optional[bool] = ..., directory: _Optional[str] = ..., policy: _Optional[str] = ..., offered: _Optional[int] = ..., selected: _Optional[int] = ..., written: _Optional[int] = ..., skipped_queue_full: _Optional[int] = ..., skipped_quota: _Optional[int] = ..., skipped_error: _Optional[int] = ..., bytes_used: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., queued: _Optional[int] = ...) -> None: ...

class LineStatus(_message.Message):
    __slots__ = ("drift_enabled", "drift_state", "psi_threshold", "ks_threshold", "drift_window", "drift_min_frames", "statistics", "cameras", "capture", "model_version", "feedback_skipped_batches", "cameras_tracked", "cameras_omitted", "coils")
    DRIFT_ENABLED_FIELD_NUMBER: _ClassVar[int]
    DRIFT_STATE_FIELD_NUMBER: _ClassVar[int]
    PSI_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DRIFT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    DRIFT_MIN_FRAMES_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_SKIPPED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_TRACKED_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_OMITTED_FIELD_NUMBER: _ClassVar[int]
    COILS_FIELD_NUMBER: _ClassVar[int]
    drift_enabled: bool
    drift_state: str
    psi_threshold: float
    ks_threshold: float
    drift_window: int
    drift_min_frames: int
    statistics: _containers.RepeatedScalarFieldContainer[str]
    cameras: _containers.RepeatedCompositeFieldContainer[CameraDrift]
    capture: CaptureStatus
    model_version: str
    feedback_skipped_batches: int
    cameras_tracked: int
    cameras_omitted: int
    coils: CoilTrackingStatus
    def __init__(self, drift_enabled: _Optional[bool] = ..., drift_state: _Optional[str] = ..., psi_threshold: _Optional[float] = ..., ks_threshold: _Optional[float] = ..., drift_window: _Optional[int] = ..., drift_min_frames: _Optional[int] = ..., statistics: _Optional[_Iterable[str]] = ..., cameras: _Optional[_Iterable[_Union[CameraDrift, _Mapping]]] = ..., capture: _Optional[_Union[CaptureStatus, _Mapping]] = ..., model_version: _Optional[str] = ..., feedback_skipped_batches: _Optional[int] = ..., cameras_tracked: _Optional[int] = ..., cameras_omitted: _Optional[int] = ..., coils: _Optional[_Union[CoilTrackingStatus, _Mapping]] = ...) -> None: ...

class CoilTrackingStatus(_message.Message):
    __slots__ = ("enabled", "db_state", "spool_frames", "spool_bytes", "open_coils", "frames_stored", "late_frames", "refused_frames", "coils_closed")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    DB_STATE_FIELD_NUMBER: _ClassVar[int]
    SPOOL_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_COILS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_STORED_FIELD_NUMBER: _ClassVar[int]
    LATE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FRAMES_FIELD_NUMBER: _ClassVar[int]
    COILS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    db_state: str
    spool_frames: int
    spool_bytes: int
    open_coils: int
    frames_stored: int
    late_frames: int
    refused_frames: int
    coils_closed: int
    def __init__(self, enabled: _Optional[bool] = ..., db_state: _Optional[str] = ..., spool_frames: _Optional[int] = ..., spool_bytes: _Optional[int] = ..., open_coils: _Optional[int] = ..., frames_stored: _Optional[int] = ..., late_frames: _Optional[int] = ..., refused_frames: _Optional[int] = ..., coils_closed: _Optional[int] = ...) -> None: ...

class GetLineRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CameraGeometry(_message.Message):
    __slots__ = ("camera_id", "lane_start_mm", "mm_per_px_across", "mm_per_px_along", "along_axis", "frame_width_px", "frame_height_px")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    LANE_START_MM_FIELD_NUMBER: _ClassVar[int]
    MM_PER_PX_ACROSS_FIELD_NUMBER: _ClassVar[int]
    MM_PER_PX_ALONG_FIELD_NUMBER: _ClassVar[int]
    ALONG_AXIS_FIELD_NUMBER: _ClassVar[int]
    FRAME_WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    FRAME_HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    lane_start_mm: float
    mm_per_px_across: float
    mm_per_px_along: float
    along_axis: str
    frame_width_px: int
    frame_height_px: int
    def __init__(self, camera_id: _Optional[str] = ..., lane_start_mm: _Optional[float] = ..., mm_per_px_across: _Optional[float] = ..., mm_per_px_along: _Optional[float] = ..., along_axis: _Optional[str] = ..., frame_width_px: _Optional[int] = ..., frame_height_px: _Optional[int] = ...) -> None: ...

class Roll(_message.Message):
    __slots__ = ("name", "diameter_mm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIAMETER_MM_FIELD_NUMBER: _ClassVar[int]
    name: str
    diameter_mm: float
    def __init__(self, name: _Optional[str] = ..., diameter_mm: _Optional[float] = ...) -> None: ...

class Line(_message.Message):
    __slots__ = ("name", "strip_width_mm", "cameras", "rolls")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRIP_WIDTH_MM_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    ROLLS_FIELD_NUMBER: _ClassVar[int]
    name: str
    strip_width_mm: float
    cameras: _containers.RepeatedCompositeFieldContainer[CameraGeometry]
    rolls: _containers.RepeatedCompositeFieldContainer[Roll]
    def __init__(self, name: _Optional[str] = ..., strip_width_mm: _Optional[float] = ..., cameras: _Optional[_Iterable[_Union[CameraGeometry, _Mapping]]] = ..., rolls: _Optional[_Iterable[_Union[Roll, _Mapping]]] = ...) -> None: ...

class EndCoilRequest(_message.Message):
    __slots__ = ("coil_id", "length_mm")
    COIL_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_MM_FIELD_NUMBER: _ClassVar[int]
    coil_id: str
    length_mm: float
    def __init__(self, coil_id: _Optional[str] = ..., length_mm: _Optional[float] = ...) -> None: ...

class ListCoilsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCoilsResponse(_message.Message):
    __slots__ = ("coils", "next_page_token")
    COILS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    coils: _containers.RepeatedCompositeFieldContainer[CoilSummary]
    next_page_token: str
    def __init__(self, coils: _Optional[_Iterable[_Union[CoilSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCoilRequest(_message.Message):
    __slots__ = ("coil_id",)
    COIL_ID_FIELD_NUMBER: _ClassVar[int]
    coil_id: str
    def __init__(self, coil_id: _Optional[str] = ...) -> None: ...

class FrameRef(_message.Message):
    __slots__ = ("camera_id", "frame_id")
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    camera_id: str
    frame_id: int
    def __init__(self, camera_id: _Optional[str] = ..., frame_id: _Optional[int] = ...) -> None: ...

class DefectRecord(_message.Message):
    __slots__ = ("coil_id", "class_id", "along_start_mm", "along_end_mm", "across_start_mm", "across_end_mm", "area_mm2", "max_probability", "frames", "cameras")
    COIL_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    ALONG_START_MM_FIELD_NUMBER: _ClassVar[int]
    ALONG_END_MM_FIELD_NUMBER: _ClassVar[int]
    ACROSS_START_MM_FIELD_NUMBER: _ClassVar[int]
    ACROSS_END_MM_FIELD_NUMBER: _ClassVar[int]
    AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    MAX_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    coil_id: str
    class_id: int
    along_start_mm: float
    along_end_mm: float
    across_start_mm: float
    across_end_mm: float
    area_mm2: float
    max_probability: float
    frames: _containers.RepeatedCompositeFieldContainer[FrameRef]
    cameras: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, coil_id: _Optional[str] = ..., class_id: _Optional[int] = ..., along_start_mm: _Optional[float] = ..., along_end_mm: _Optional[float] = ..., across_start_mm: _Optional[float] = ..., across_end_mm: _Optional[float] = ..., area_mm2: _Optional[float] = ..., max_probability: _Optional[float] = ..., frames: _Optional[_Iterable[_Union[FrameRef, _Mapping]]] = ..., cameras: _Optional[_Iterable[str]] = ...) -> None: ...

class ClassDefects(_message.Message):
    __slots__ = ("class_id", "defects", "per_100m")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    DEFECTS_FIELD_NUMBER: _ClassVar[int]
    PER_100M_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    defects: int
    per_100m: float
    def __init__(self, class_id: _Optional[int] = ..., defects: _Optional[int] = ..., per_100m: _Optional[float] = ...) -> None: ...

class CoilSummary(_message.Message):
    __slots__ = ("coil_id", "state", "opened_unix_s", "last_frame_unix_s", "closed_unix_s", "close_reason", "length_mm", "frames", "late_frames", "classes", "largest")
    COIL_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_FRAME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CLOSED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    LENGTH_MM_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    LATE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    LARGEST_FIELD_NUMBER: _ClassVar[int]
    coil_id: str
    state: str
    opened_unix_s: float
    last_frame_unix_s: float
    closed_unix_s: float
    close_reason: str
    length_mm: float
    frames: int
    late_frames: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassDefects]
    largest: _containers.RepeatedCompositeFieldContainer[DefectRecord]
    def __init__(self, coil_id: _Optional[str] = ..., state: _Optional[str] = ..., opened_unix_s: _Optional[float] = ..., last_frame_unix_s: _Optional[float] = ..., closed_unix_s: _Optional[float] = ..., close_reason: _Optional[str] = ..., length_mm: _Optional[float] = ..., frames: _Optional[int] = ..., late_frames: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassDefects, _Mapping]]] = ..., largest: _Optional[_Iterable[_Union[DefectRecord, _Mapping]]] = ...) -> None: ...

class Coil(_message.Message):
    __slots__ = ("summary", "records", "periodic", "grade", "grade_rule")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_FIELD_NUMBER: _ClassVar[int]
    GRADE_FIELD_NUMBER: _ClassVar[int]
    GRADE_RULE_FIELD_NUMBER: _ClassVar[int]
    summary: CoilSummary
    records: _containers.RepeatedCompositeFieldContainer[DefectRecord]
    periodic: _containers.RepeatedCompositeFieldContainer[PeriodicDefect]
    grade: str
    grade_rule: str
    def __init__(self, summary: _Optional[_Union[CoilSummary, _Mapping]] = ..., records: _Optional[_Iterable[_Union[DefectRecord, _Mapping]]] = ..., periodic: _Optional[_Iterable[_Union[PeriodicDefect, _Mapping]]] = ..., grade: _Optional[str] = ..., grade_rule: _Optional[str] = ...) -> None: ...

class PeriodicDefect(_message.Message):
    __slots__ = ("class_id", "across_start_mm", "across_end_mm", "period_mm", "confidence", "first_mm", "last_mm", "count", "roll", "records")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    ACROSS_START_MM_FIELD_NUMBER: _ClassVar[int]
    ACROSS_END_MM_FIELD_NUMBER: _ClassVar[int]
    PERIOD_MM_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_MM_FIELD_NUMBER: _ClassVar[int]
    LAST_MM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ROLL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    across_start_mm: float
    across_end_mm: float
    period_mm: float
    confidence: float
    first_mm: float
    last_mm: float
    count: int
    roll: str
    records: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, class_id: _Optional[int] = ..., across_start_mm: _Optional[float] = ..., across_end_mm: _Optional[float] = ..., period_mm: _Optional[float] = ..., confidence: _Optional[float] = ..., first_mm: _Optional[float] = ..., last_mm: _Optional[float] = ..., count: _Optional[int] = ..., roll: _Optional[str] = ..., records: _Optional[_Iterable[int]] = ...) -> None: ...
