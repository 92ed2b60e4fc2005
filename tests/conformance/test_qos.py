"""QoS: downgrade to the granted QoS, overlapping subscriptions, subscription identifiers,
re-subscription, the QoS 2 flows in both directions (exactly once), Receive Maximum."""

import time

import pytest

import mqttraw
from helpers import QUIET, V5, V311, VERSION_IDS, VERSIONS, unique
from mqttraw import PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBSCRIPTION_ID, Publish


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_8_4_6_delivered_qos_is_minimum_of_published_and_granted(clients, version):
    """Delivered QoS = min(publish QoS, granted QoS), all nine combinations (3.1.1: 3.8.4-6,
    5.0: 3.8.4-8)."""
    p = unique()
    subs = {}
    for granted in (0, 1, 2):
        s = clients(version)
        assert s.subscribe(f"{p}/g{granted}", granted) == granted
        subs[granted] = s
    pub = clients(version)
    for granted in (0, 1, 2):
        for qos in (0, 1, 2):
            pub.publish(f"{p}/g{granted}", f"{qos}".encode(), qos=qos)
    for granted, s in subs.items():
        got = sorted((int(m.payload), m.qos) for m in s.collect(3))
        assert got == [(q, min(q, granted)) for q in (0, 1, 2)], f"granted {granted}: {got}"
        s.expect_none(0.2)


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_8_4_3_resubscribe_replaces(clients, version):
    """A SUBSCRIBE with a filter identical to an existing one replaces that subscription
    (new QoS, new options); messages are still delivered once."""
    p = unique()
    s = clients(version)
    assert s.subscribe(f"{p}/t", 0) == 0
    assert s.subscribe(f"{p}/t", 2) == 2
    pub = clients(version)
    pub.publish(f"{p}/t", b"x", qos=2)
    msgs = s.drain()
    assert [(m.payload, m.qos) for m in msgs] == [(b"x", 2)]
    assert s.subscribe(f"{p}/t", 1) == 1
    pub.publish(f"{p}/t", b"y", qos=2)
    assert [(m.payload, m.qos) for m in s.drain()] == [(b"y", 1)]


def test_mqtt_3_3_4_5_overlapping_subscriptions_identifiers_per_copy(clients):
    """Overlapping subscriptions `a/+` (QoS 0, id 1) and `a/#` (QoS 2, id 2): one copy at
    QoS 2 with both identifiers (3.3.4-2, 3.3.4-4), or one copy per subscription, each with
    that subscription's QoS and identifier (3.3.4-5)."""
    p = unique()
    s = clients(V5)
    assert s.subscribe(f"{p}/+", 0, sub_id=1) == 0
    assert s.subscribe(f"{p}/#", 2, sub_id=2) == 2
    clients(V5).publish(f"{p}/x", b"m", qos=2)
    msgs = s.drain()
    if len(msgs) == 1:
        assert msgs[0].qos == 2
        assert sorted(msgs[0].properties.SubscriptionIdentifier) == [1, 2]
    else:
        got = sorted((m.properties.SubscriptionIdentifier, m.qos) for m in msgs)
        assert got == [([1], 0), ([2], 2)], got


@pytest.mark.mosquitto_deviates("sends one copy per matching subscription, as 3.3.4-2 allows")
def test_mqtt_3_3_4_2_overlapping_subscriptions_one_copy_at_max_qos(clients):
    """One client subscribed to `a/+` (QoS 0, id 1) and `a/#` (QoS 2, id 2) gets ONE copy
    at QoS 2 carrying both Subscription Identifiers (3.3.4-2, 3.3.4-4). The specification
    also allows one copy per subscription; this server's choice is one copy."""
    p = unique()
    s = clients(V5)
    assert s.subscribe(f"{p}/+", 0, sub_id=1) == 0
    assert s.subscribe(f"{p}/#", 2, sub_id=2) == 2
    pub = clients(V5)
    pub.publish(f"{p}/x", b"one", qos=2)
    msgs = s.drain()
    assert len(msgs) == 1, f"{len(msgs)} copies"
    assert msgs[0].qos == 2
    assert sorted(msgs[0].properties.SubscriptionIdentifier) == [1, 2]


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(
            V311,
            marks=pytest.mark.mosquitto_deviates(
                "a 3.1.1 client gets one copy at the QoS of one matching subscription, not the maximum"
            ),
        ),
        V5,
    ],
    ids=VERSION_IDS,
)
def test_mqtt_3_3_5_1_overlapping_subscriptions_respect_max_qos(clients, version):
    """3.1.1 (3.3.5-1) and 5.0 (3.3.4-2): with overlapping subscriptions the message is
    delivered respecting the maximum QoS of all matching subscriptions (further copies allowed)."""
    p = unique()
    s = clients(version)
    s.subscribe(f"{p}/+", 0)
    s.subscribe(f"{p}/#", 1)
    clients(version).publish(f"{p}/x", b"m", qos=1)
    msgs = s.drain()
    assert msgs and max(m.qos for m in msgs) == 1


def test_mqtt_3_3_4_3_subscription_identifier_sent(clients):
    """The identifier given at SUBSCRIBE comes back in each PUBLISH the subscription
    matched; a subscription without one gets none."""
    p = unique()
    s = clients(V5)
    s.subscribe(f"{p}/with", 1, sub_id=268435455)  # the largest varint identifier
    s.subscribe(f"{p}/without", 1)
    pub = clients(V5)
    pub.publish(f"{p}/with", b"1", qos=1)
    pub.publish(f"{p}/without", b"2", qos=1)
    a, b = s.collect(2)
    assert a.properties.SubscriptionIdentifier == [268435455]
    assert not hasattr(b.properties, "SubscriptionIdentifier")


def test_mqtt_3_8_3_3_no_local(clients):
    """No Local = 1: the server does not send a client's own publishes back to it."""
    p = unique()
    c = clients(V5)
    c.subscribe(f"{p}/t", 1, no_local=True)
    other = clients(V5)
    other.subscribe(f"{p}/t", 1)
    c.publish(f"{p}/t", b"mine", qos=1)
    assert other.expect().payload == b"mine"
    c.expect_none()
    other.publish(f"{p}/t", b"theirs", qos=1)
    assert c.expect().payload == b"theirs"


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
def test_mqtt_4_3_3_publisher_qos2_flow(raws, version):
    """Publisher side: PUBLISH QoS 2 → PUBREC (same id); PUBREL → PUBCOMP (same id)."""
    r = raws(version)
    assert r.connect(unique("c"))[1] == 0
    r.send(mqttraw.publish(version, f"{unique()}/t", b"q2", qos=2, pkid=42))
    rec = r.expect(PUBREC)
    assert rec.pkid == 42
    if version == 5 and len(rec.body) > 2:
        assert rec.body[2] < 0x80, f"PUBREC reason {rec.body[2]:#x}"
    r.send(mqttraw.ack(PUBREL, 42))
    comp = r.expect(PUBCOMP)
    assert comp.pkid == 42
    assert comp.body[2:3] in (b"", b"\x00")


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
def test_mqtt_4_3_3_subscriber_qos2_flow(clients, raws, version):
    """Subscriber side: the server sends PUBLISH QoS 2, answers PUBREC with PUBREL (flags
    0b0010, same id), and the flow ends with our PUBCOMP; a paho subscriber receives QoS 2."""
    p = unique()
    r = raws(version)
    assert r.connect(unique("c"))[1] == 0
    assert r.subscribe(1, [(f"{p}/t", 2)]) == [2]
    paho_sub = clients(V5 if version == 5 else 4)
    assert paho_sub.subscribe(f"{p}/t", 2) == 2
    clients(V5).publish(f"{p}/t", b"exactly", qos=2)
    pkt = r.expect(PUBLISH)
    pub = Publish(pkt, version)
    assert (pub.qos, pub.payload, pub.dup) == (2, b"exactly", False)
    r.send(mqttraw.ack(PUBREC, pub.pkid))
    rel = r.expect(PUBREL)
    assert rel.flags == 0b0010 and rel.pkid == pub.pkid
    r.send(mqttraw.ack(PUBCOMP, pub.pkid))
    assert r.read(QUIET) is None, "nothing more after PUBCOMP"
    m = paho_sub.expect()
    assert (m.payload, m.qos) == (b"exactly", 2)


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
def test_mqtt_4_3_3_2_qos2_duplicate_publish_delivered_once(clients, raws, version):
    """The same QoS 2 PUBLISH re-sent with DUP and the same packet id before PUBREL is one
    message: subscribers get it once (4.3.3: the receiver MUST NOT cause duplicate onward
    delivery)."""
    p = unique()
    sub = clients(version if version == 4 else V5)
    sub.subscribe(f"{p}/t", 2)
    r = raws(version)
    assert r.connect(unique("c"))[1] == 0
    r.send(mqttraw.publish(version, f"{p}/t", b"once", qos=2, pkid=7))
    assert r.expect(PUBREC).pkid == 7
    r.send(mqttraw.publish(version, f"{p}/t", b"once", qos=2, pkid=7, dup=True))
    assert r.expect(PUBREC).pkid == 7
    r.send(mqttraw.ack(PUBREL, 7))
    assert r.expect(PUBCOMP).pkid == 7
    # After PUBCOMP the id is free again: a new message with id 7 is a new message.
    r.send(mqttraw.publish(version, f"{p}/t", b"again", qos=2, pkid=7))
    assert r.expect(PUBREC).pkid == 7
    r.send(mqttraw.ack(PUBREL, 7))
    assert r.expect(PUBCOMP).pkid == 7
    got = [m.payload for m in sub.drain(1.0)]
    assert got == [b"once", b"again"]


@pytest.mark.mosquitto_deviates("2.0.11 sends 4 new PUBLISHes after 2 PUBACKs with Receive Maximum 2")
def test_mqtt_3_3_4_7_receive_maximum_limits_unacknowledged_publishes(clients, raws):
    """A 5.0 subscriber with Receive Maximum 2 that withholds PUBACKs has at most 2
    unacknowledged QoS 1 PUBLISHes at once (3.3.4-7); acknowledging releases the rest."""
    p = unique()
    r = raws(5)
    assert r.connect(unique("c"), props=[(mqttraw.RECEIVE_MAXIMUM, 2)])[1] == 0
    assert r.subscribe(1, [(f"{p}/t", 1)]) == [1]
    pub = clients(V5)
    for n in range(6):
        pub.publish(f"{p}/t", f"{n}".encode(), qos=1)
    first = r.publishes(1.0)
    assert len(first) == 2, f"{len(first)} unacknowledged PUBLISHes in flight"
    got = list(first)
    deadline = time.monotonic() + 5
    pending = list(first)
    while len(got) < 6 and time.monotonic() < deadline:
        for m in pending:
            r.send(mqttraw.ack(mqttraw.PUBACK, m.pkid))
        pending = r.publishes(0.5)
        assert len(pending) <= 2
        got += pending
    for m in pending:
        r.send(mqttraw.ack(mqttraw.PUBACK, m.pkid))
    assert [m.payload for m in got] == [f"{n}".encode() for n in range(6)]


def test_subscription_identifier_property_is_varint(raws):
    """A raw SUBSCRIBE with Subscription Identifier 300 (two-byte varint) is echoed."""
    p = unique()
    r = raws(5)
    assert r.connect(unique("c"))[1] == 0
    assert r.subscribe(1, [(f"{p}/t", 0)], props=[(SUBSCRIPTION_ID, 300)]) == [0]
    r2 = raws(5)
    assert r2.connect(unique("c"))[1] == 0
    r2.send(mqttraw.publish(5, f"{p}/t", b"v"))
    msg = Publish(r.expect(PUBLISH), 5)
    assert msg.prop(SUBSCRIPTION_ID) == [300]
