"""Validation of the task instruction, from the serialized ``std_msgs/String`` bytes on.

The node subscribes to the instruction *serialized* so that invalid UTF-8 is seen as such (rclpy would
otherwise replace bad bytes with U+FFFD and hand over a plausible-looking string).
"""
from __future__ import annotations

import struct
import unicodedata
from collections import deque
from typing import Hashable

# CDR encapsulation identifiers (first two bytes of a serialized message, big-endian on the wire).
_PLAIN = {0x0000: '>', 0x0001: '<', 0x0006: '>', 0x0007: '<'}   # CDR_BE/LE, PLAIN_CDR2_BE/LE
_DELIMITED = {0x0008: '>', 0x0009: '<'}                         # D_CDR2_BE/LE: a 4-byte DHEADER first


class InstructionError(ValueError):
    """An instruction the policy must not act on; ``kind`` names its diagnostics counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def string_bytes_from_cdr(serialized: bytes) -> bytes:
    """The raw bytes of the single ``string`` field of a serialized ``std_msgs/String`` (no decoding)."""
    if len(serialized) < 8:
        raise InstructionError('instruction_malformed', f'serialized message of {len(serialized)} bytes is too short')
    kind = struct.unpack_from('>H', serialized, 0)[0]
    offset = 4
    if kind in _DELIMITED:
        order = _DELIMITED[kind]
        offset += 4
    elif kind in _PLAIN:
        order = _PLAIN[kind]
    else:
        raise InstructionError('instruction_malformed', f'unknown CDR encapsulation 0x{kind:04x}')
    if len(serialized) < offset + 4:
        raise InstructionError('instruction_malformed', 'serialized message ends before the string length')
    length = struct.unpack_from(order + 'I', serialized, offset)[0]   # includes the terminating NUL
    start = offset + 4
    if length == 0:
        return b''
    if start + length > len(serialized):
        raise InstructionError('instruction_malformed',
                               f'string length {length} runs past the {len(serialized)}-byte message')
    payload = bytes(serialized[start:start + length])
    return payload[:-1] if payload.endswith(b'\x00') else payload


def validate_instruction(raw: bytes | str, max_bytes: int) -> str:
    """The cleaned instruction text; raises ``InstructionError`` for empty, too long or non-UTF-8 input.

    Empty means no letter or digit once whitespace and invisible format characters are gone.
    """
    if isinstance(raw, str):
        raw = raw.encode('utf-8', errors='surrogatepass')
    if len(raw) > max_bytes:
        raise InstructionError('instruction_too_long', f'instruction of {len(raw)} bytes exceeds '
                               f'max_instruction_bytes = {max_bytes}')
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as error:
        raise InstructionError('instruction_not_utf8', f'instruction is not valid UTF-8 ({error.reason} at byte '
                               f'{error.start})') from None
    if '\x00' in text:
        raise InstructionError('instruction_not_utf8', 'instruction contains a NUL character')
    # invisible format characters (zero-width spaces, byte-order marks) read as nothing, not as a word
    text = ' '.join(''.join(ch for ch in text if unicodedata.category(ch) != 'Cf').split())
    if not text:
        raise InstructionError('instruction_empty', 'instruction is empty or whitespace only')
    if not any(ch.isalnum() for ch in text):
        raise InstructionError('instruction_empty', f'instruction has no letter or digit: {text[:200]!r}')
    return text


class DuplicateFilter:
    """Recognises a message seen before (the instruction arrives on two subscriptions: latched and volatile)."""

    def __init__(self, size: int = 64) -> None:
        self._seen: deque[Hashable] = deque(maxlen=size)

    def seen(self, key: Hashable) -> bool:
        """True when ``key`` (publisher and sequence number of a message) came before; remembers it."""
        if key in self._seen:
            return True
        self._seen.append(key)
        return False
