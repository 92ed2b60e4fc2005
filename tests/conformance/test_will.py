"""Will messages (3.1.1 section 3.1.2.5, 5.0 sections 3.1.2.5 and 3.1.3.2): published when
the connection is lost, not after a normal DISCONNECT, delayed by the Will Delay
Interval, and on DISCONNECT with reason 0x04."""

import time

import pytest

import mqttraw
from helpers import V5, VERSION_IDS, unique
from mqttraw import WILL_DELAY, SESSION_EXPIRY


def will_watcher(clients, version):
    topic = f"{unique()}/will"
    w = clients(V5 if version == 5 else 4)
    w.subscribe(topic, 1)
    return topic, w


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
def test_mqtt_3_1_2_8_will_published_on_connection_loss(clients, raws, version):
    """The socket closes without DISCONNECT: the server publishes the Will Message."""
    topic, w = will_watcher(clients, version)
    r = raws(version)
    assert r.connect(unique("c"), will={"topic": topic, "payload": b"gone", "qos": 1})[1] == 0
    r.close()
    m = w.expect(5)
    assert (m.topic, m.payload) == (topic, b"gone")


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
def test_mqtt_3_1_2_10_will_not_published_after_disconnect(clients, raws, version):
    """A normal DISCONNECT (5.0: reason 0x00) removes the Will Message unpublished
    (3.1.1: 3.1.2-10, 3.14.4-3; 5.0: 3.1.2-10, 3.14.4-3)."""
    topic, w = will_watcher(clients, version)
    r = raws(version)
    assert r.connect(unique("c"), will={"topic": topic, "payload": b"gone", "qos": 1})[1] == 0
    r.send(mqttraw.disconnect(version, 0x00 if version == 5 else None))
    time.sleep(0.2)
    r.close()
    w.expect_none(1.0)


def test_mqtt_3_14_2_disconnect_with_will_message(clients, raws):
    """MQTT 5: DISCONNECT with reason 0x04 (Disconnect with Will Message) publishes the Will."""
    topic, w = will_watcher(clients, 5)
    r = raws(5)
    assert r.connect(unique("c"), will={"topic": topic, "payload": b"asked", "qos": 1})[1] == 0
    r.send(mqttraw.disconnect(5, 0x04))
    m = w.expect(5)
    assert m.payload == b"asked"


def test_mqtt_3_1_3_9_will_delay_reconnect_in_time_cancels_will(clients, raws):
    """MQTT 5: Will Delay 2 s and a new connection to the session within 1 s: no Will
    (3.1.3-9)."""
    topic, w = will_watcher(clients, 5)
    cid = unique("c")
    r = raws(5)
    will = {"topic": topic, "payload": b"late", "qos": 1, "props": [(WILL_DELAY, 2)]}
    assert r.connect(cid, clean=False, will=will, props=[(SESSION_EXPIRY, 60)])[1] == 0
    r.close()
    time.sleep(0.5)
    r2 = raws(5)
    present, code = r2.connect(cid, clean=False, props=[(SESSION_EXPIRY, 60)])
    assert (present, code) == (1, 0)
    w.expect_none(2.5)
    # End the session (expiry 0 at DISCONNECT); the reconnect had no Will.
    r2.send(mqttraw.frame(0xE0, bytes([0x00]) + mqttraw.properties([(SESSION_EXPIRY, 0)])))
    w.expect_none(0.5)


def test_mqtt_3_1_3_9_will_delay_publishes_after_interval(clients, raws):
    """MQTT 5: Will Delay 2 s and no reconnect: the Will comes about 2 s after the loss."""
    topic, w = will_watcher(clients, 5)
    r = raws(5)
    will = {"topic": topic, "payload": b"late", "qos": 1, "props": [(WILL_DELAY, 2)]}
    assert r.connect(unique("c"), clean=False, will=will, props=[(SESSION_EXPIRY, 60)])[1] == 0
    lost = time.monotonic()
    r.close()
    w.expect_none(1.2)
    m = w.expect(5)
    waited = time.monotonic() - lost
    assert m.payload == b"late"
    assert waited >= 1.5, f"will after {waited:.2f}s"
