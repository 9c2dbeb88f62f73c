"""The least a Python receiver of a folder must do: bench/small_files.py's "python floor" contender.

    python bench/python_floor.py PORT SERVER_SHA256 OUTPUT

A fresh interpreter that imports only the standard library, connects over TLS
to 127.0.0.1:PORT (the server's certificate pinned by its SHA-256, as a
client pins a server's identity), reads a listing and then the files' bytes,
checks each file's SHA-256 and writes it under OUTPUT with one
``open(O_EXCL)``/``write``/``close``, its folder opened once. No
configuration, identity proof, catalog protocol, staging or state: what is
left is the interpreter's start, TLS, SHA-256 and the syscalls, which any
Python client pays. Next to rsync in the same run it says how much of the
time a Python client has left for everything else.

The stream (from ``small_files.start_floor_sender``): frames of a head (two
big-endian 32-bit numbers: how many files, how many bytes) and a body; the
first body is the JSON listing ``[[name, size, sha256], ...]``, each next one
the bytes of the next files, in listing order.
"""
import hashlib
import json
import os
import socket
import ssl
import struct
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
FRAME_HEAD = struct.Struct(">II")  # files in the frame, bytes in its body
IO_TIMEOUT_S = 10.0  # as a client's transfer.io_timeout: a stuck sender ends the run with an error, not a hang


def receive_exactly(connection: ssl.SSLSocket, size: int) -> memoryview:
    data = memoryview(bytearray(size))
    got = 0
    while got < size:
        count = connection.recv_into(data[got:], size - got)
        if not count:
            raise SystemExit("python floor: the sender closed the stream early")
        got += count
    return data


def receive_frame(connection: ssl.SSLSocket) -> tuple[int, memoryview]:
    """(how many files the frame holds, its body)."""
    files, size = FRAME_HEAD.unpack(receive_exactly(connection, FRAME_HEAD.size))
    return files, receive_exactly(connection, size)


def folder_descriptors(output: str, names: list[str]) -> dict[str, int]:
    """Each folder of ``names`` made under ``output`` and opened once: files are then created relative to it."""
    descriptors = {}
    for folder in sorted({name.rpartition("/")[0] for name in names}):
        path = os.path.join(output, folder)
        os.makedirs(path, exist_ok=True)
        descriptors[folder] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    return descriptors


def main() -> None:
    port, server_sha256, output = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # pinned below instead, as a client does
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S)) as connection:
        if hashlib.sha256(connection.getpeercert(binary_form=True)).hexdigest() != server_sha256:
            raise SystemExit("python floor: not the server pinned")
        listing = json.loads(bytes(receive_frame(connection)[1]))
        folders = folder_descriptors(output, [name for name, _, _ in listing])
        sha256, written = hashlib.sha256, 0
        while written < len(listing):
            files, frame = receive_frame(connection)
            offset = 0
            for name, size, digest in listing[written:written + files]:
                data = frame[offset:offset + size]
                offset += size
                if sha256(data).hexdigest() != digest:
                    raise SystemExit(f"python floor: {name} failed SHA-256 verification")
                folder, _, base = name.rpartition("/")
                descriptor = os.open(base, WRITE_FLAGS, 0o644, dir_fd=folders[folder])
                try:
                    os.write(descriptor, data)
                finally:
                    os.close(descriptor)
            written += files


if __name__ == "__main__":
    main()
