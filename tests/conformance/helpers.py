"""The broker under test and a small synchronous wrapper around a paho-mqtt client."""

import os
import queue
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

HOST = os.environ.get("MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQTT_PORT", "1883"))

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
VERSIONS = [V311, V5]
VERSION_IDS = ["v311", "v5"]

# How long a test waits for something that must arrive, and for something that must not.
TIMEOUT = 3.0
QUIET = 0.5


def unique(prefix="conf"):
    """A fresh topic prefix or client id, so tests never see each other's messages."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}" if prefix == "conf" else f"{prefix}-{uuid.uuid4().hex[:12]}"


def publish_props(**values):
    props = Properties(PacketTypes.PUBLISH)
    for k, v in values.items():
        setattr(props, k, v)
    return props


class Client:
    """A paho client with a message queue and blocking connect/subscribe/publish."""

    def __init__(self, version=V5, client_id=None, clean_session=True):
        self.version = version
        self.client_id = client_id if client_id is not None else unique("c")
        kwargs = {"clean_session": clean_session} if version == V311 else {}
        self.mqttc = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=version,
            reconnect_on_failure=False,
            **kwargs,
        )
        self.messages = queue.Queue()
        self._connack = queue.Queue()
        self._acks = {}
        self._cond = threading.Condition()
        self.disconnected = threading.Event()
        self.mqttc.on_connect = self._on_connect
        self.mqttc.on_message = lambda c, u, msg: self.messages.put(msg)
        self.mqttc.on_subscribe = self._on_ack
        self.mqttc.on_unsubscribe = self._on_ack
        self.mqttc.on_disconnect = lambda *a: self.disconnected.set()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self._connack.put((int(flags.session_present), reason_code.value, properties))

    def _on_ack(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._acks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _wait_ack(self, mid):
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, TIMEOUT), "no SUBACK/UNSUBACK"
            return self._acks.pop(mid)

    def connect(self, clean_start=True, session_expiry=None, receive_maximum=None, keepalive=30):
        """Connects; returns (session present, reason code, CONNACK properties)."""
        if self.version == V5:
            props = Properties(PacketTypes.CONNECT)
            if session_expiry is not None:
                props.SessionExpiryInterval = session_expiry
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            self.mqttc.connect(HOST, PORT, keepalive, clean_start=clean_start, properties=props)
        else:
            self.mqttc.connect(HOST, PORT, keepalive)
        self.mqttc.loop_start()
        try:
            result = self._connack.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no CONNACK for {self.client_id!r}") from None
        assert result[1] == 0, f"CONNACK refused {self.client_id!r}: {result[1]:#x}"
        return result

    def subscribe(self, topic, qos=0, no_local=False, rap=False, retain_handling=0, sub_id=None):
        """Subscribes; returns the SUBACK reason code (granted QoS or >= 0x80)."""
        if self.version == V5:
            opts = mqtt.SubscribeOptions(
                qos=qos, noLocal=no_local, retainAsPublished=rap, retainHandling=retain_handling
            )
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            _, mid = self.mqttc.subscribe(topic, options=opts, properties=props)
        else:
            _, mid = self.mqttc.subscribe(topic, qos)
        return self._wait_ack(mid)[0]

    def unsubscribe(self, topic):
        """Unsubscribes; returns the UNSUBACK reason code (always 0 for 3.1.1)."""
        _, mid = self.mqttc.unsubscribe(topic)
        codes = self._wait_ack(mid)
        return codes[0] if codes else 0

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        """Publishes and waits for the flow to complete (PUBACK / PUBCOMP)."""
        info = self.mqttc.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"publish to {topic} not acknowledged"
        return info

    def expect(self, timeout=TIMEOUT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id!r} received nothing within {timeout}s") from None

    def expect_none(self, wait=QUIET):
        try:
            msg = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {msg.topic}: {msg.payload!r}")

    def drain(self, wait=QUIET):
        """Every message that arrives until `wait` seconds pass without one."""
        out = []
        while True:
            try:
                out.append(self.messages.get(timeout=wait))
            except queue.Empty:
                return out

    def collect(self, count, timeout=TIMEOUT):
        """Exactly `count` messages (fails if fewer arrive within `timeout`)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(left, 0.01)))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {count} messages") from None
        return out

    def disconnect(self, reason=None, session_expiry=None):
        props = None
        if session_expiry is not None:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = session_expiry
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason) if reason is not None else None
        if self.version == V5:
            self.mqttc.disconnect(reasoncode=rc, properties=props)
        else:
            self.mqttc.disconnect()
        self.disconnected.wait(TIMEOUT)
        self.mqttc.loop_stop()


class Clients:
    """Every client a test made, disconnected at its end."""

    def __init__(self):
        self.all = []

    def __call__(self, version=V5, client_id=None, clean_session=True, connect=True, **connect_kw):
        c = Client(version, client_id, clean_session)
        self.all.append(c)
        if connect:
            c.connect(**connect_kw)
        return c

    def close(self):
        for c in self.all:
            try:
                if c.mqttc.is_connected():
                    c.mqttc.disconnect()
                c.mqttc.loop_stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
