"""A TensorBoard event-file writer for scalars, with no TensorFlow and no PyTorch.

TensorBoard reads ``events.out.tfevents.*`` files: TFRecord framing (length, masked CRC-32C of the
length, payload, masked CRC-32C of the payload) around serialized ``Event`` protocol buffers. Scalars need
only five fields, encoded here by hand: Event.wall_time (1, double), Event.step (2, int64),
Event.file_version (3, string), Event.summary (5) holding Summary.value (1) with Value.tag (1, string)
and Value.simple_value (2, float), and Event.session_log (7) with SessionLog.status (1; START is 1).
A resumed run's file starts with a START event at the step it resumed from: TensorBoard then drops the
events of earlier files from that step on (its "purge"), so every step is shown once. (tensorboardX writes the same format but imports PyTorch when it is
installed, which cost 16 s per run here.)
"""

from __future__ import annotations

import os
import socket
import struct
import time

__all__ = ["ScalarWriter"]


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


_SESSION_START = 1


def _event(step: int, wall_time: float, *, file_version: str | None = None, tag: str | None = None,
           value: float | None = None, session_status: int | None = None) -> bytes:
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if session_status is not None:
        out += _bytes_field(7, _field(1, 0, _varint(session_status)))
    if tag is not None:
        summary_value = _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
        out += _bytes_field(5, _bytes_field(1, summary_value))
    return out


class ScalarWriter:
    """Append scalars to a new event file in ``folder`` (one file per writer, as TensorBoard expects).

    ``restart_step``: the first step a (re)started run writes; earlier files' events from it on are superseded.
    """

    def __init__(self, folder: str, restart_step: int | None = None):
        os.makedirs(folder, exist_ok=True)
        # TensorBoard reads a folder's files in name order: the time stamp puts a resumed run's file last.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(folder, name)
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))
        if restart_step is not None:
            self._write(_event(int(restart_step), time.time(), session_status=_SESSION_START))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + struct.pack("<I", _masked_crc(length)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(int(step), time.time(), tag=tag, value=float(value)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
