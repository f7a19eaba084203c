#!/usr/bin/env python3
"""A membus datagram-fallback client in plain Python (standard library only).

Written from docs/protocol.md alone: it speaks the control protocol over the broker's
AF_UNIX SOCK_SEQPACKET socket, one frame per datagram, and never maps shared memory.

    fallback_client.py [--socket PATH|@NAME] [--topic T] both [--count N]
        subscribe and publish on one topic, check every message comes back intact
    fallback_client.py [--socket ...] [--topic T] pub MESSAGE...
    fallback_client.py [--socket ...] [--topic T] sub [--count N]

The socket defaults to $MEMBUS_SOCKET, then $XDG_RUNTIME_DIR/membus/bus.sock, then
/tmp/membus-$UID/bus.sock (the broker's own default).
"""
import argparse
import os
import socket
import struct
import sys

MAGIC = 0x5355424D
VERSION = 1
HEADER = struct.Struct("<IBBHIHHQ")  # magic, version, flags, type, body_len, fd_count, reserved, request id

T_HELLO, T_WELCOME, T_ERROR, T_OK = 0x0001, 0x0002, 0x0003, 0x0004
T_SHUTDOWN = 0x0007
T_CREATE_PUBLISHER, T_RING_GRANTED, T_CLOSE_PUBLISHER = 0x0101, 0x0102, 0x0104
T_SUBSCRIBE, T_SUBSCRIBED, T_UNSUBSCRIBE = 0x0201, 0x0202, 0x0204
T_PEER_GONE, T_EVICTED = 0x0301, 0x0302
T_PUBLISH, T_DELIVER = 0x0401, 0x0402
TRANSPORT_DATAGRAM = 2
MODE_ANY = 0


class BrokerError(Exception):
    def __init__(self, code, message):
        super().__init__(f"broker error {code}: {message}")
        self.code = code


def default_socket():
    if os.environ.get("MEMBUS_SOCKET"):
        return os.environ["MEMBUS_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return os.path.join(runtime, "membus", "bus.sock")
    tmp = os.environ.get("TMPDIR", "")
    base = tmp if tmp.startswith("/") else "/tmp"
    return os.path.join(base, f"membus-{os.getuid()}", "bus.sock")


def pack_str(text):
    raw = text.encode("utf-8")
    return struct.pack("<H", len(raw)) + raw


class Client:
    """One connection to the broker: requests with ids, events queued until read."""

    def __init__(self, path, name):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        address = "\0" + path[1:] if path.startswith("@") else path
        try:
            self.sock.connect(address)
        except OSError as e:
            raise SystemExit(f"no broker at {path} ({e.strerror}): start one with `bus-broker`")
        self.next_id = 1
        self.events = []
        _, body = self.request(T_HELLO, struct.pack("<HB", 1, TRANSPORT_DATAGRAM) + pack_str(name))
        (_version, self.client_id, _max_frame, self.max_message) = struct.unpack_from("<HQII", body)

    def send(self, msg_type, body=b"", request_id=0):
        self.sock.send(HEADER.pack(MAGIC, VERSION, 0, msg_type, len(body), 0, 0, request_id) + body)

    def recv(self):
        dgram = self.sock.recv(65536)
        if not dgram:
            raise EOFError("the broker closed the connection")
        magic, version, _flags, msg_type, body_len, _fds, _res, request_id = HEADER.unpack_from(dgram)
        if magic != MAGIC or version != VERSION or body_len != len(dgram) - HEADER.size:
            raise ValueError("received something that is not a membus v1 frame")
        body = dgram[HEADER.size:]
        if msg_type == T_ERROR:
            code, n = struct.unpack_from("<HH", body)
            raise BrokerError(code, body[4 : 4 + n].decode("utf-8", "replace"))
        return msg_type, request_id, body

    def request(self, msg_type, body):
        request_id = self.next_id
        self.next_id += 1
        self.send(msg_type, body, request_id)
        while True:
            reply_type, rid, reply = self.recv()
            if rid == request_id:
                return reply_type, reply
            self.events.append((reply_type, reply))

    def publisher(self, topic):
        body = struct.pack("<QIBB", 0, 0, MODE_ANY, TRANSPORT_DATAGRAM) + pack_str(topic)
        kind, reply = self.request(T_CREATE_PUBLISHER, body)
        assert kind == T_RING_GRANTED, kind
        _role, _mode, _slot, max_message, _topic_id, publisher_id = struct.unpack_from("<BBHIQQ", reply)
        return publisher_id, min(max_message, self.max_message)

    def publish(self, publisher_id, payload):
        self.send(T_PUBLISH, struct.pack("<Q", publisher_id) + payload)

    def subscriber(self, topic):
        kind, reply = self.request(T_SUBSCRIBE, struct.pack("<BB", MODE_ANY, TRANSPORT_DATAGRAM) + pack_str(topic))
        assert kind == T_SUBSCRIBED, kind
        subscriber_id, _topic_id, _mode, _delivery = struct.unpack_from("<QQBB", reply)
        return subscriber_id

    def deliveries(self):
        """Yields (publisher id, seq, lost_before, payload) for every DELIVER, forever."""
        while True:
            if self.events:
                msg_type, body = self.events.pop(0)
            else:
                msg_type, _, body = self.recv()
            if msg_type == T_DELIVER:
                _sub, pub, seq, _ts, lost = struct.unpack_from("<QQQQQ", body)
                yield pub, seq, lost, body[40:]
            elif msg_type in (T_EVICTED, T_SHUTDOWN):
                raise EOFError("evicted or the broker is shutting down")


def payload_for(i, size):
    return bytes((i * 7 + j) & 0xFF for j in range(size))


def run_both(args):
    sub = Client(args.socket, "py-fallback-sub")
    sub_id = sub.subscriber(args.topic)
    pub = Client(args.socket, "py-fallback-pub")
    pub_id, max_message = pub.publisher(args.topic)
    sizes = [0, 1, 7, 64, 1000, max_message] + [(i * 37) % 300 for i in range(args.count)]
    for i, size in enumerate(sizes):
        pub.publish(pub_id, payload_for(i, size))
    received = sub.deliveries()
    for i, size in enumerate(sizes):
        publisher, seq, lost, payload = next(received)
        if publisher != pub_id or seq != i or lost != 0:
            raise SystemExit(f"message {i}: publisher {publisher} seq {seq} lost {lost}")
        if payload != payload_for(i, size):
            raise SystemExit(f"message {i}: {len(payload)} bytes differ from the {size} sent")
    print(f"ok: {len(sizes)} messages from 0 to {max_message} bytes, boundaries and bytes intact "
          f"(subscriber {sub_id}, publisher {pub_id})")


def run_pub(args):
    client = Client(args.socket, "py-fallback-pub")
    pub_id, _ = client.publisher(args.topic)
    for text in args.message:
        client.publish(pub_id, text.encode("utf-8"))
    # A round trip makes sure every PUBLISH before it was processed.
    client.request(T_CLOSE_PUBLISHER, struct.pack("<Q", pub_id))


def run_sub(args):
    client = Client(args.socket, "py-fallback-sub")
    client.subscriber(args.topic)
    for n, (_pub, _seq, lost, payload) in enumerate(client.deliveries(), 1):
        note = f" (lost {lost} before)" if lost else ""
        print(payload.decode("utf-8", "replace") + note, flush=True)
        if args.count and n >= args.count:
            break


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=default_socket())
    parser.add_argument("--topic", default="demo.python")
    sub = parser.add_subparsers(dest="command", required=True)
    both = sub.add_parser("both")
    both.add_argument("--count", type=int, default=1000)
    p = sub.add_parser("pub")
    p.add_argument("message", nargs="+")
    s = sub.add_parser("sub")
    s.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    {"both": run_both, "pub": run_pub, "sub": run_sub}[args.command](args)


if __name__ == "__main__":
    try:
        main()
    except (BrokerError, EOFError) as e:
        sys.exit(f"fallback_client: {e}")
