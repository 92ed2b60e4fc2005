"""Hand-encoded MQTT 3.1.1 / 5.0 packets over a plain socket.

For the checks a well-behaved client library cannot make: losing the socket without a
DISCONNECT, re-sending a QoS 2 PUBLISH with DUP before PUBREL, withholding PUBACKs,
sending an invalid topic filter, and reading the exact flags the server set.
"""

import socket
import struct
import time

from helpers import HOST, PORT

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# MQTT 5 property identifiers (spec table 2-4) by the type of their value.
_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16 = {0x13, 0x21, 0x22, 0x23}
_U32 = {0x02, 0x11, 0x18, 0x27}
_VARINT = {0x0B}
_STR = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BIN = {0x09, 0x16}
_PAIR = {0x26}

MESSAGE_EXPIRY = 0x02
SESSION_EXPIRY = 0x11
RECEIVE_MAXIMUM = 0x21
WILL_DELAY = 0x18
SUBSCRIPTION_ID = 0x0B


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def read_varint(buf, i):
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def string(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack("!H", len(s)) + s


def properties(items=()):
    """Encodes a property list [(id, value), ...] with its length prefix."""
    body = bytearray()
    for pid, value in items:
        body += varint(pid)
        if pid in _BYTE:
            body.append(value)
        elif pid in _U16:
            body += struct.pack("!H", value)
        elif pid in _U32:
            body += struct.pack("!I", value)
        elif pid in _VARINT:
            body += varint(value)
        elif pid in _STR or pid in _BIN:
            body += string(value)
        elif pid in _PAIR:
            body += string(value[0]) + string(value[1])
        else:
            raise ValueError(f"unknown property {pid:#x}")
    return varint(len(body)) + bytes(body)


def parse_properties(buf, i):
    """Returns ([(id, value), ...], index after the properties)."""
    length, i = read_varint(buf, i)
    end = i + length
    out = []
    while i < end:
        pid, i = read_varint(buf, i)
        if pid in _BYTE:
            value = buf[i]
            i += 1
        elif pid in _U16:
            (value,) = struct.unpack_from("!H", buf, i)
            i += 2
        elif pid in _U32:
            (value,) = struct.unpack_from("!I", buf, i)
            i += 4
        elif pid in _VARINT:
            value, i = read_varint(buf, i)
        elif pid in _STR or pid in _BIN:
            (n,) = struct.unpack_from("!H", buf, i)
            value = bytes(buf[i + 2 : i + 2 + n])
            i += 2 + n
        elif pid in _PAIR:
            (n,) = struct.unpack_from("!H", buf, i)
            k = bytes(buf[i + 2 : i + 2 + n])
            i += 2 + n
            (m,) = struct.unpack_from("!H", buf, i)
            v = bytes(buf[i + 2 : i + 2 + m])
            i += 2 + m
            value = (k, v)
        else:
            raise ValueError(f"unknown property {pid:#x}")
        out.append((pid, value))
    return out, end


def frame(first_byte, body):
    return bytes([first_byte]) + varint(len(body)) + bytes(body)


def connect(version, client_id, clean=True, keepalive=30, will=None, props=()):
    """CONNECT; `will` is a dict: topic, payload, qos (1), retain (False), props (())."""
    flags = 0x02 if clean else 0
    if will:
        flags |= 0x04 | (will.get("qos", 1) << 3) | (0x20 if will.get("retain") else 0)
    body = string("MQTT") + bytes([version, flags]) + struct.pack("!H", keepalive)
    if version == 5:
        body += properties(props)
    body += string(client_id)
    if will:
        if version == 5:
            body += properties(will.get("props", ()))
        body += string(will["topic"]) + string(will["payload"])
    return frame(0x10, body)


def publish(version, topic, payload, qos=0, pkid=0, dup=False, retain=False, props=()):
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = string(topic)
    if qos:
        body += struct.pack("!H", pkid)
    if version == 5:
        body += properties(props)
    if isinstance(payload, str):
        payload = payload.encode()
    return frame(first, body + payload)


def ack(kind, pkid):
    """PUBACK / PUBREC / PUBREL / PUBCOMP with reason Success (omitted, as both versions allow)."""
    first = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70}[kind]
    return frame(first, struct.pack("!H", pkid))


def subscribe(version, pkid, filters, props=()):
    """`filters`: [(filter, options byte)]; the options byte is the QoS in 3.1.1."""
    body = struct.pack("!H", pkid)
    if version == 5:
        body += properties(props)
    for f, opts in filters:
        body += string(f) + bytes([opts])
    return frame(0x82, body)


def disconnect(version, reason=None):
    if version == 5 and reason is not None:
        return frame(0xE0, bytes([reason, 0]))
    return frame(0xE0, b"")


class Packet:
    def __init__(self, first, body):
        self.type = first >> 4
        self.flags = first & 0x0F
        self.body = body

    def __repr__(self):
        return f"Packet(type={self.type}, flags={self.flags:#x}, body={self.body[:40]!r})"

    @property
    def pkid(self):
        return struct.unpack_from("!H", self.body, 0)[0]


class Publish:
    def __init__(self, pkt, version):
        self.qos = (pkt.flags >> 1) & 3
        self.dup = bool(pkt.flags & 0x08)
        self.retain = bool(pkt.flags & 0x01)
        b = pkt.body
        (n,) = struct.unpack_from("!H", b, 0)
        self.topic = bytes(b[2 : 2 + n]).decode()
        i = 2 + n
        self.pkid = None
        if self.qos:
            (self.pkid,) = struct.unpack_from("!H", b, i)
            i += 2
        self.props = []
        if version == 5:
            self.props, i = parse_properties(b, i)
        self.payload = bytes(b[i:])

    def prop(self, pid):
        return [v for p, v in self.props if p == pid]


class Raw:
    """One MQTT connection driven byte by byte."""

    def __init__(self, version=4):
        self.version = version
        self.sock = socket.create_connection((HOST, PORT), timeout=5)
        self.buf = bytearray()
        self.closed = False
        # Reason code of a DISCONNECT the server sent (MQTT 5), if any.
        self.disconnect_reason = None

    def send(self, data):
        self.sock.sendall(data)

    def read(self, timeout=3.0):
        """The next packet; None on timeout or when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._take()
            if pkt is not None:
                return pkt
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                self.closed = True
                return None
            if not chunk:
                self.closed = True
                return None
            self.buf += chunk

    def _take(self):
        if len(self.buf) < 2:
            return None
        try:
            length, i = read_varint(self.buf, 1)
        except IndexError:
            return None
        if len(self.buf) < i + length:
            return None
        pkt = Packet(self.buf[0], bytes(self.buf[i : i + length]))
        del self.buf[: i + length]
        return pkt

    def expect(self, kind, timeout=3.0):
        """The next packet, which must be of `kind`."""
        pkt = self.read(timeout)
        assert pkt is not None, f"expected packet type {kind}, got none (closed={self.closed})"
        assert pkt.type == kind, f"expected packet type {kind}, got {pkt}"
        return pkt

    def connect(self, client_id, **kw):
        """Sends CONNECT; returns (session present, reason code)."""
        self.send(connect(self.version, client_id, **kw))
        ack_ = self.expect(CONNACK)
        return ack_.body[0] & 1, ack_.body[1]

    def subscribe(self, pkid, filters, props=()):
        """Returns the SUBACK reason codes, or None if the server closed the connection."""
        self.send(subscribe(self.version, pkid, filters, props))
        pkt = self.read()
        while pkt is not None and pkt.type == PUBLISH:
            pkt = self.read()
        if pkt is not None and pkt.type == DISCONNECT:
            self.disconnect_reason = pkt.body[0] if pkt.body else 0
            self.closed = self.read(1.0) is None
            return None
        if pkt is None or pkt.type != SUBACK:
            return None
        i = 2
        if self.version == 5:
            _, i = parse_properties(pkt.body, i)
        return list(pkt.body[i:])

    def publishes(self, wait):
        """Every PUBLISH that arrives within `wait` seconds (not acknowledged)."""
        out = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            pkt = self.read(left)
            if pkt is None:
                return out
            if pkt.type == PUBLISH:
                out.append(Publish(pkt, self.version))

    def close(self):
        """Drops the connection without DISCONNECT."""
        try:
            self.sock.close()
        except OSError:
            pass
