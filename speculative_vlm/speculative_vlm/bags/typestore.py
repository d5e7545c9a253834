"""Message definitions for bags, read from the interface files installed with each package.

ROS 2 installs every interface's source under ``share/<package>/<msg|srv|action>/``; those
are the exact definitions rclpy was generated from, so the type hashes written into a bag
match what ``ros2 bag`` would write. Only when a package ships no file do we fall back to
the definitions rosbags carries for Kilted.
"""

from __future__ import annotations

from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from rosbags.interfaces import Nodetype
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore


class UnknownMessageType(LookupError):
    """A message type whose definition is neither installed nor known to rosbags."""


def _split(msgtype: str) -> tuple[str, str, str]:
    parts = msgtype.split("/")
    if len(parts) != 3:
        raise UnknownMessageType(f"{msgtype!r} is not a full ROS 2 type name; expected 'package/msg/Name'")
    return parts[0], parts[1], parts[2]


def _installed_definitions(msgtype: str) -> dict:
    """Parse the installed .msg (or .idl) file that defines `msgtype`; {} when there is none."""
    package, kind, name = _split(msgtype)
    try:
        share = Path(get_package_share_directory(package))
    except PackageNotFoundError:
        return {}
    msg_file = share / kind / f"{name}.msg"
    if msg_file.is_file():
        return get_types_from_msg(msg_file.read_text(encoding="utf-8"), msgtype)
    # Types generated from a service or action (Foo_Request, Foo_Feedback) live in Foo.idl.
    candidates = [share / kind / f"{name}.idl"]
    if "_" in name:
        candidates.append(share / kind / f"{name.rsplit('_', 1)[0]}.idl")
    for idl_file in candidates:
        if idl_file.is_file():
            types = get_types_from_idl(idl_file.read_text(encoding="utf-8"))
            if msgtype in types:
                return types
    return {}


def _referenced_types(fields: list) -> set[str]:
    names = set()
    for _, (nodetype, args) in fields:
        if nodetype == Nodetype.NAME:
            names.add(args)
        elif nodetype in (Nodetype.ARRAY, Nodetype.SEQUENCE) and args[0][0] == Nodetype.NAME:
            names.add(args[0][1])
    return names


def installed_typestore(msgtypes: list[str] | tuple[str, ...] = ()) -> Typestore:
    """A typestore holding `msgtypes` and everything they reference, from installed definitions.

    Raises UnknownMessageType naming the package to install when a definition is missing.
    """
    store = get_typestore(Stores.EMPTY)
    add_types(store, msgtypes)
    return store


def add_types(store: Typestore, msgtypes: list[str] | tuple[str, ...]) -> None:
    """Register `msgtypes` (and their dependencies) in `store`; types already there are kept."""
    fallback = None
    pending = list(msgtypes)
    while pending:
        msgtype = pending.pop()
        if msgtype in store.fielddefs:
            continue
        types = _installed_definitions(msgtype)
        if msgtype not in types:
            fallback = fallback or get_typestore(Stores.ROS2_KILTED)
            if msgtype not in fallback.fielddefs:
                package = msgtype.split("/")[0]
                raise UnknownMessageType(
                    f"no definition of {msgtype}: install or source the package {package!r} "
                    f"(its share/{package}/ must be on AMENT_PREFIX_PATH)"
                )
            types = {msgtype: fallback.fielddefs[msgtype]}
        new = {name: definition for name, definition in types.items() if name not in store.fielddefs}
        store.register(new)
        for _, fields in new.values():
            pending.extend(_referenced_types(fields) - store.fielddefs.keys())


def installed_hash(msgtype: str) -> str | None:
    """The RIHS01 type hash of the installed definition of `msgtype`; None when it has none."""
    try:
        return installed_typestore([msgtype]).hash_rihs01(msgtype)
    except UnknownMessageType:
        return None
