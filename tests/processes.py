"""Helpers for tests that start processes on localhost."""

import socket


def free_ports(count):
    """`count` distinct free ports on 127.0.0.1: bound together (so they
    differ), then released for the processes' gRPC servers."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)
               for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
