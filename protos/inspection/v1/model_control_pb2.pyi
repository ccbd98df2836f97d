from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "role", "loaded", "file")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    version: str
    role: str
    loaded: bool
    file: str
    def __init__(self, version: _Optional[str] = ..., role: _Optional[str] = ..., loaded: _Optional[bool] = ..., file: _Optional[str] = ...) -> None: ...

class ModelList(_message.Message):
    __slots__ = ("production", "candidate", "history", "versions")
    PRODUCTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    production: str
    candidate: str
    history: _containers.RepeatedScalarFieldContainer[str]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, production: _Optional[str] = ..., candidate: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("last",)
    LAST_FIELD_NUMBER: _ClassVar[int]
    last: int
    def __init__(self, last: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("time", "action", "version", "sha256", "who", "outcome", "why")
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    time: str
    action: str
    version: str
    sha256: str
    who: str
    outcome: str
    why: str
    def __init__(self, time: _Optional[str] = ..., action: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., who: _Optional[str] = ..., outcome: _Optional[str] = ..., why: _Optional[str] = ...) -> None: ...

class AuditLog(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class GetModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShadowRequest(_message.Message):
    __slots__ = ("share",)
    SHARE_FIELD_NUMBER: _ClassVar[int]
    share: float
    def __init__(self, share: _Optional[float] = ...) -> None: ...

class ClassAgreement(_message.Message):
    __slots__ = ("name", "presence_agreement", "dice", "dice_frames", "pixel_count_difference")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    DICE_FIELD_NUMBER: _ClassVar[int]
    DICE_FRAMES_FIELD_NUMBER: _ClassVar[int]
    PIXEL_COUNT_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    presence_agreement: float
    dice: float
    dice_frames: int
    pixel_count_difference: float
    def __init__(self, name: _Optional[str] = ..., presence_agreement: _Optional[float] = ..., dice: _Optional[float] = ..., dice_frames: _Optional[int] = ..., pixel_count_difference: _Optional[float] = ...) -> None: ...

class ModelsStatus(_message.Message):
    __slots__ = ("production", "candidate", "shadow_share", "shadow_frames", "shadow_skipped", "disagreeing_frames", "candidate_latency_ms", "classes")
    PRODUCTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SHARE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    DISAGREEING_FRAMES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    production: str
    candidate: str
    shadow_share: float
    shadow_frames: int
    shadow_skipped: int
    disagreeing_frames: int
    candidate_latency_ms: float
    classes: _containers.RepeatedCompositeFieldContainer[ClassAgreement]
    def __init__(self, production: _Optional[str] = ..., candidate: _Optional[str] = ..., shadow_share: _Optional[float] = ..., shadow_frames: _Optional[int] = ..., shadow_skipped: _Optional[int] = ..., disagreeing_frames: _Optional[int] = ..., candidate_latency_ms: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[ClassAgreement, _Mapping]]] = ...) -> None: ...
