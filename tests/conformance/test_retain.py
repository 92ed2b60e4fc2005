"""Retained messages (3.1.1 section 3.3.1.3, 5.0 section 3.3.1.3) and the MQTT 5
subscription options Retain As Published and Retain Handling."""

import pytest

from helpers import V5, VERSION_IDS, VERSIONS, unique


@pytest.fixture
def retained(clients):
    """Publishes retained messages and clears them at the end of the test, so that a
    later `#` subscriber does not get them."""
    topics = []

    def put(version, topic, payload, qos=1):
        topics.append(topic)
        clients(version).publish(topic, payload, qos=qos, retain=True)

    yield put
    if topics:
        c = clients(V5)
        for t in topics:
            c.publish(t, b"", qos=1, retain=True)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_3_1_6_retained_message_sent_on_subscribe_with_retain_flag(clients, retained, version):
    """A new subscription gets the last retained message of each matching topic, with
    RETAIN = 1 (3.1.1: 3.3.1-6, 3.3.1-8; 5.0: 3.3.1-9)."""
    p = unique()
    retained(version, f"{p}/a", b"first")
    retained(version, f"{p}/a", b"last")
    retained(version, f"{p}/b", b"b")
    s = clients(version)
    s.subscribe(f"{p}/+", 1)
    got = sorted((m.topic, m.payload, m.retain) for m in s.drain())
    assert got == [(f"{p}/a", b"last", True), (f"{p}/b", b"b", True)]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_3_1_9_live_delivery_has_retain_zero(clients, retained, version):
    """A retained PUBLISH that matches an established subscription is forwarded with
    RETAIN = 0 (3.1.1: 3.3.1-9; 5.0 without Retain As Published: 3.3.1-12)."""
    p = unique()
    s = clients(version)
    s.subscribe(f"{p}/t", 1)
    retained(version, f"{p}/t", b"live")
    m = s.expect()
    assert (m.payload, m.retain) == (b"live", False)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_3_1_10_empty_retained_payload_deletes(clients, retained, version):
    """A retained PUBLISH with an empty payload removes the retained message (3.1.1:
    3.3.1-10/-11; 5.0: 3.3.1-6/-7); it is forwarded to current subscribers as usual."""
    p = unique()
    retained(version, f"{p}/t", b"state")
    live = clients(version)
    live.subscribe(f"{p}/t", 1)
    assert live.expect().payload == b"state"
    clients(version).publish(f"{p}/t", b"", qos=1, retain=True)
    assert live.expect().payload == b""
    later = clients(version)
    later.subscribe(f"{p}/t", 1)
    later.expect_none()


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_8_4_6_retained_qos_is_minimum_of_retained_and_granted(clients, retained, version):
    """A retained message is sent at min(its QoS, the granted QoS)."""
    p = unique()
    retained(version, f"{p}/q2", b"2", qos=2)
    retained(version, f"{p}/q0", b"0", qos=0)
    s1 = clients(version)
    s1.subscribe(f"{p}/q2", 1)
    m = s1.expect()
    assert (m.payload, m.qos, m.retain) == (b"2", 1, True)
    s2 = clients(version)
    s2.subscribe(f"{p}/q0", 2)
    m = s2.expect()
    assert (m.payload, m.qos, m.retain) == (b"0", 0, True)


@pytest.mark.parametrize("rap", [False, True], ids=["rap0", "rap1"])
def test_mqtt_3_3_1_12_retain_as_published(clients, retained, rap):
    """MQTT 5: Retain As Published 0 → forwarded with RETAIN 0 (3.3.1-12); 1 → RETAIN as
    published (3.3.1-13). Messages sent because of a new subscription keep RETAIN 1."""
    p = unique()
    s = clients(V5)
    s.subscribe(f"{p}/t", 1, rap=rap)
    retained(V5, f"{p}/t", b"r")
    clients(V5).publish(f"{p}/t", b"n", qos=1)
    got = [(m.payload, m.retain) for m in s.collect(2)]
    assert got == [(b"r", rap), (b"n", False)]


def test_mqtt_3_3_1_9_retain_handling_0_sends_on_every_subscribe(clients, retained):
    p = unique()
    retained(V5, f"{p}/t", b"r")
    s = clients(V5)
    s.subscribe(f"{p}/t", 1, retain_handling=0)
    assert s.expect().retain
    s.subscribe(f"{p}/t", 1, retain_handling=0)
    m = s.expect()
    assert (m.payload, m.retain) == (b"r", True)


def test_mqtt_3_3_1_10_retain_handling_1_sends_only_for_new_subscription(clients, retained):
    p = unique()
    retained(V5, f"{p}/t", b"r")
    s = clients(V5)
    s.subscribe(f"{p}/t", 1, retain_handling=1)
    assert s.expect().payload == b"r"
    s.subscribe(f"{p}/t", 1, retain_handling=1)
    s.expect_none()


def test_mqtt_3_3_1_11_retain_handling_2_sends_none(clients, retained):
    p = unique()
    retained(V5, f"{p}/t", b"r")
    s = clients(V5)
    s.subscribe(f"{p}/t", 1, retain_handling=2)
    s.expect_none()
    clients(V5).publish(f"{p}/t", b"live", qos=1)
    assert s.expect().payload == b"live"
