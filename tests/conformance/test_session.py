"""Sessions: Session Present, persistent 3.1.1 sessions (subscriptions and QoS 1 queue
kept while offline), MQTT 5 Session Expiry, Message Expiry of queued messages."""

import time

import pytest

from helpers import V5, V311, VERSION_IDS, VERSIONS, publish_props, unique


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_2_2_1_clean_start_session_present_0(clients, version):
    """Clean session / clean start = 1: CONNACK Session Present = 0, even when a session
    existed (3.1.1: 3.2.2-1; 5.0: 3.2.2-2)."""
    cid = unique("c")
    kw = {"clean_start": False, "session_expiry": 60} if version == V5 else {}
    first = clients(version, client_id=cid, clean_session=False, **kw)
    first.subscribe(f"{unique()}/t", 1)
    first.disconnect()
    again = clients(version, client_id=cid, clean_session=True, connect=False)
    present, _, _ = again.connect(clean_start=True) if version == V5 else again.connect()
    assert present == 0
    again.disconnect()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_2_2_2_persistent_session_reconnect_session_present_1(clients, version):
    """Resuming a stored session: Session Present = 1 (3.1.1: 3.2.2-2; 5.0: 3.2.2-3)."""
    cid = unique("c")
    kw = {"clean_start": False, "session_expiry": 60} if version == V5 else {}
    c = clients(version, client_id=cid, clean_session=False, connect=False)
    present, _, _ = c.connect(**kw)
    assert present == 0, "a new session"
    c.subscribe(f"{unique()}/t", 1)
    c.disconnect()
    c2 = clients(version, client_id=cid, clean_session=False, connect=False)
    present, _, _ = c2.connect(**kw)
    assert present == 1
    # Clean up: end the session.
    c2.disconnect()
    clients(version, client_id=cid, clean_session=True).disconnect()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_1_2_4_persistent_session_keeps_subscriptions_and_queues_qos1(clients, version):
    """A persistent session keeps its subscriptions across a reconnect and gets the QoS 1
    messages published while it was offline, in order (3.1.1: 3.1.2-4/-5, 4.6.0-6;
    5.0: 3.1.2-23, 4.6.0-6). QoS 0 messages while offline are not asserted either way."""
    cid = unique("c")
    p = unique()
    kw = {"clean_start": False, "session_expiry": 60} if version == V5 else {}
    c = clients(version, client_id=cid, clean_session=False, connect=False)
    c.connect(**kw)
    assert c.subscribe(f"{p}/t", 1) == 1
    c.disconnect()
    pub = clients(version)
    for n in range(10):
        pub.publish(f"{p}/t", f"{n}".encode(), qos=1)
    pub.publish(f"{p}/t", b"qos0", qos=0)
    c2 = clients(version, client_id=cid, clean_session=False, connect=False)
    present, _, _ = c2.connect(**kw)
    assert present == 1
    got = [m.payload for m in c2.drain(0.7) if m.payload != b"qos0"]
    assert got == [f"{n}".encode() for n in range(10)]
    # The subscription is still there for live messages.
    pub.publish(f"{p}/t", b"live", qos=1)
    assert c2.expect().payload == b"live"
    c2.disconnect()
    clients(version, client_id=cid, clean_session=True).disconnect()


def test_mqtt_3_1_2_23_session_expiry_0_ends_session_at_close(clients):
    """MQTT 5: Session Expiry Interval absent (0): the session ends with the connection;
    a reconnect with Clean Start = 0 gets Session Present = 0 and no subscriptions."""
    cid = unique("c")
    p = unique()
    c = clients(V5, client_id=cid, clean_start=False)
    c.subscribe(f"{p}/t", 1)
    c.disconnect()
    clients(V5).publish(f"{p}/t", b"while away", qos=1)
    c2 = clients(V5, client_id=cid, connect=False)
    present, _, _ = c2.connect(clean_start=False)
    assert present == 0
    clients(V5).publish(f"{p}/t", b"after", qos=1)
    c2.expect_none()


def test_mqtt_3_1_2_23_session_expiry_interval_honoured(clients):
    """MQTT 5: Session Expiry 2 s: the session is present 1 s after the disconnect and
    gone 4 s after it."""
    cid = unique("c")
    c = clients(V5, client_id=cid, clean_start=False, session_expiry=2)
    c.subscribe(f"{unique()}/t", 1)
    c.disconnect()
    time.sleep(1.0)
    c2 = clients(V5, client_id=cid, connect=False)
    present, _, _ = c2.connect(clean_start=False, session_expiry=2)
    assert present == 1, "session gone before its expiry"
    c2.disconnect()
    time.sleep(4.0)
    c3 = clients(V5, client_id=cid, connect=False)
    present, _, _ = c3.connect(clean_start=False)
    assert present == 0, "session outlived its expiry"


@pytest.mark.mosquitto_deviates(
    "expiry is checked at one-second clock resolution: a session is resumed up to ~1 s after it expired"
)
def test_mqtt_3_1_2_23_expired_session_not_resumed_before_sweep(clients):
    """A reconnect just after the expiry instant gets Session Present = 0 even if the
    server's periodic expiry sweep has not run yet (expiry 1 s, reconnect at ~1.3 s)."""
    for _ in range(3):
        cid = unique("c")
        c = clients(V5, client_id=cid, clean_start=False, session_expiry=1)
        c.subscribe(f"{unique()}/t", 1)
        c.disconnect()
        time.sleep(1.3)
        c2 = clients(V5, client_id=cid, connect=False)
        present, _, _ = c2.connect(clean_start=False)
        assert present == 0, "an expired session was resumed"
        c2.disconnect()


def test_mqtt_3_3_2_5_expired_queued_message_not_delivered(clients):
    """MQTT 5: a message queued for an offline session whose Message Expiry Interval
    passes before delivery starts is not delivered (3.3.2-5)."""
    cid = unique("c")
    p = unique()
    c = clients(V5, client_id=cid, clean_start=False, session_expiry=60)
    c.subscribe(f"{p}/t", 1)
    c.disconnect()
    pub = clients(V5)
    pub.publish(f"{p}/t", b"short", qos=1, properties=publish_props(MessageExpiryInterval=1))
    pub.publish(f"{p}/t", b"forever", qos=1)
    time.sleep(2.5)
    c2 = clients(V5, client_id=cid, connect=False)
    assert c2.connect(clean_start=False, session_expiry=60)[0] == 1
    assert [m.payload for m in c2.drain()] == [b"forever"]
    c2.disconnect(session_expiry=0)


def test_mqtt_3_3_2_6_delivered_message_expiry_decremented(clients):
    """MQTT 5: the PUBLISH sent to a subscriber carries the Message Expiry Interval minus
    the time the message waited in the server (3.3.2-6)."""
    cid = unique("c")
    p = unique()
    c = clients(V5, client_id=cid, clean_start=False, session_expiry=60)
    c.subscribe(f"{p}/t", 1)
    live = clients(V5)
    live.subscribe(f"{p}/t", 1)
    c.disconnect()
    clients(V5).publish(f"{p}/t", b"m", qos=1, properties=publish_props(MessageExpiryInterval=30))
    m = live.expect()
    assert 28 <= m.properties.MessageExpiryInterval <= 30
    time.sleep(2.2)
    c2 = clients(V5, client_id=cid, connect=False)
    c2.connect(clean_start=False, session_expiry=60)
    m = c2.expect()
    assert m.payload == b"m"
    assert 1 <= m.properties.MessageExpiryInterval <= 28, m.properties.MessageExpiryInterval
    c2.disconnect(session_expiry=0)


@pytest.mark.parametrize("version", [V311], ids=["v311"])
def test_mqtt_3_1_2_6_clean_session_discards_previous_session(clients, version):
    """3.1.1: connecting with Clean Session = 1 discards a stored session: its queued
    messages and subscriptions are gone (3.1.2-6)."""
    cid = unique("c")
    p = unique()
    c = clients(version, client_id=cid, clean_session=False)
    c.subscribe(f"{p}/t", 1)
    c.disconnect()
    clients(version).publish(f"{p}/t", b"queued", qos=1)
    c2 = clients(version, client_id=cid, clean_session=True)
    c2.expect_none()
    c2.disconnect()
    c3 = clients(version, client_id=cid, clean_session=False, connect=False)
    present, _, _ = c3.connect()
    assert present == 0
    clients(version).publish(f"{p}/t", b"later", qos=1)
    c3.expect_none()
    c3.disconnect()
    clients(version, client_id=cid, clean_session=True).disconnect()


def test_mqtt_3_3_4_9_resend_on_reconnect_honours_new_receive_maximum(clients, raws):
    """A persistent session holds 6 unacknowledged QoS 1 deliveries; the client reconnects
    with Receive Maximum 2: the server re-sends (DUP, same packet ids) no more than 2
    unacknowledged PUBLISHes at once (3.3.4-9, 4.4.0-1), the rest as it acknowledges,
    in order, before a message published after the reconnect."""
    import mqttraw

    p, cid = unique(), unique("c")
    expiry = [(mqttraw.SESSION_EXPIRY, 60)]
    r = raws(5)
    assert r.connect(cid, clean=False, props=expiry)[1] == 0
    assert r.subscribe(1, [(f"{p}/t", 1)]) == [1]
    pub = clients(V5)
    for n in range(6):
        pub.publish(f"{p}/t", f"{n}".encode(), qos=1)
    first = r.publishes(1.0)
    assert [m.payload for m in first] == [f"{n}".encode() for n in range(6)]
    r.close()  # no PUBACK for any of them
    time.sleep(0.3)
    again = raws(5)
    present, code = again.connect(cid, clean=False, props=expiry + [(mqttraw.RECEIVE_MAXIMUM, 2)])
    assert (present, code) == (1, 0)
    pub.publish(f"{p}/t", b"new", qos=1)
    got, pending = [], again.publishes(1.0)
    deadline = time.monotonic() + 5
    while pending and time.monotonic() < deadline:
        assert len(pending) <= 2, f"{len(pending)} unacknowledged PUBLISHes in flight"
        got += pending
        for m in pending:
            again.send(mqttraw.ack(mqttraw.PUBACK, m.pkid))
        pending = again.publishes(0.5)
    assert [m.payload for m in got] == [f"{n}".encode() for n in range(6)] + [b"new"]
    assert all(m.dup for m in got[:6]) and not got[6].dup
    assert [m.pkid for m in got[:6]] == [m.pkid for m in first], "original packet ids"
