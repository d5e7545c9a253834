from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECULATIVE: _ClassVar[Mode]
    AUTOREGRESSIVE: _ClassVar[Mode]
SPECULATIVE: Mode
AUTOREGRESSIVE: Mode

class GenerationSettings(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "max_new_tokens", "grammar", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    grammar: str
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., grammar: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("protocol_version", "image_jpeg", "system", "prompt", "settings", "mode")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_JPEG_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    image_jpeg: bytes
    system: str
    prompt: str
    settings: GenerationSettings
    mode: Mode
    def __init__(self, protocol_version: _Optional[int] = ..., image_jpeg: _Optional[bytes] = ..., system: _Optional[str] = ..., prompt: _Optional[str] = ..., settings: _Optional[_Union[GenerationSettings, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ...) -> None: ...

class SparseDistribution(_message.Message):
    __slots__ = ("token_ids", "probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("round", "base_length", "base_tail", "tokens", "preemptive", "q")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BASE_TAIL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIVE_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_length: int
    base_tail: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    preemptive: bool
    q: _containers.RepeatedCompositeFieldContainer[SparseDistribution]
    def __init__(self, round: _Optional[int] = ..., base_length: _Optional[int] = ..., base_tail: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., preemptive: _Optional[bool] = ..., q: _Optional[_Iterable[_Union[SparseDistribution, _Mapping]]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("open", "draft", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    draft: Draft
    close: Close
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "protocol_version", "target_model", "exit_layers", "prefill_time_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    protocol_version: int
    target_model: str
    exit_layers: _containers.RepeatedScalarFieldContainer[int]
    prefill_time_s: float
    def __init__(self, session_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., target_model: _Optional[str] = ..., exit_layers: _Optional[_Iterable[int]] = ..., prefill_time_s: _Optional[float] = ...) -> None: ...

class Early(_message.Message):
    __slots__ = ("round", "accepted", "token", "confidence", "layer")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: int
    token: int
    confidence: float
    layer: int
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., confidence: _Optional[float] = ..., layer: _Optional[int] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("round", "accepted", "token", "eos", "verify_time_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TIME_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    accepted: int
    token: int
    eos: bool
    verify_time_s: float
    def __init__(self, round: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., eos: _Optional[bool] = ..., verify_time_s: _Optional[float] = ...) -> None: ...

class Dropped(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("index", "token", "eos")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token: int
    eos: bool
    def __init__(self, index: _Optional[int] = ..., token: _Optional[int] = ..., eos: _Optional[bool] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("opened", "early", "final", "dropped", "token", "error")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    early: Early
    final: Final
    dropped: Dropped
    token: Token
    error: Error
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., early: _Optional[_Union[Early, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ..., dropped: _Optional[_Union[Dropped, _Mapping]] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
