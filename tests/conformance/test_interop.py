"""Behaviour other MQTT servers show and a third-party interoperability suite
(Eclipse Paho's `client_test.py` / `client_test5.py`) relies on: clients may publish to
`$` topics (outside `$SYS`), and a server may shorten what it sends with Topic Aliases
(MQTT 5 §3.3.2.3.4) when the client allows them."""

import pytest

from helpers import V5, VERSIONS, VERSION_IDS, unique
from mqttraw import CONNACK, PUBACK, PUBLISH, SUBACK, Publish, Raw, ack, connect, subscribe

TOPIC_ALIAS_MAXIMUM = 0x22
TOPIC_ALIAS = 0x23


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_publish_to_a_dollar_topic_is_accepted_and_delivered(clients, version):
    """With a permissive ACL, a `$` topic (not `$SYS`) is an ordinary topic for publishing:
    acknowledged, and delivered to a subscription that names it (Paho's 3.1.1 `$` topics
    test expects the PUBACK within 0.2 s)."""
    tag = unique("test").replace("-", "")
    topic = f"${tag}/B"
    sub = clients(version)
    assert sub.subscribe(f"${tag}/#", 1) == 1
    wild = clients(version)
    assert wild.subscribe("+/B", 1) == 1
    clients(version).publish(topic, b"dollar", qos=1)
    assert sub.expect().topic == topic
    wild.expect_none()


def _connect_v5(client_id, alias_max=None):
    raw = Raw(5)
    props = [(TOPIC_ALIAS_MAXIMUM, alias_max)] if alias_max is not None else []
    raw.send(connect(5, client_id, props=props))
    raw.expect(CONNACK)
    return raw


@pytest.mark.mosquitto_deviates("sends no Topic Aliases (a server may; the gateway does)")
def test_mqtt_3_3_2_3_4_server_topic_aliases_within_the_clients_maximum(clients):
    """A client that allows 2 Topic Aliases: the first delivery of a topic carries the
    topic and an alias; later ones carry the alias alone (empty topic); a third topic
    goes without an alias (never more than the client allowed, §3.3.2.3.4 [MQTT-3.3.2-9]);
    every message arrives intact and in order."""
    p = unique()
    raw = _connect_v5(unique("alias"), alias_max=2)
    try:
        raw.send(subscribe(5, 1, [(f"{p}/#", 1)]))
        raw.expect(SUBACK)
        pub = clients(V5)
        sent = [(f"{p}/{t}", f"{t}{i}") for i in range(3) for t in ("a", "b", "c")]
        for topic, payload in sent:
            pub.publish(topic, payload.encode(), qos=1)
        got = []
        aliases = {}
        for pkt in iter(lambda: raw.read(2.0), None):
            if pkt.type != PUBLISH:
                continue
            m = Publish(pkt, 5)
            raw.send(ack(PUBACK, m.pkid))
            alias = m.prop(TOPIC_ALIAS)
            assert len(alias) <= 1
            if alias:
                assert 1 <= alias[0] <= 2, f"alias {alias[0]} beyond the client's maximum"
                if m.topic:
                    aliases[alias[0]] = m.topic
                else:
                    assert alias[0] in aliases, "an alias used before it was set"
                    m.topic = aliases[alias[0]]
            else:
                assert m.topic, "an empty topic without an alias"
            got.append((m.topic, m.payload.decode()))
            if len(got) == len(sent):
                break
        assert got == sent
        assert sorted(aliases.values()) == [f"{p}/a", f"{p}/b"], aliases
    finally:
        raw.close()


def test_no_server_topic_alias_without_the_clients_consent(clients):
    """A client that sent no Topic Alias Maximum (0: none allowed) never gets one."""
    p = unique()
    raw = _connect_v5(unique("noalias"))
    try:
        raw.send(subscribe(5, 1, [(f"{p}/t", 0)]))
        raw.expect(SUBACK)
        pub = clients(V5)
        for i in range(3):
            pub.publish(f"{p}/t", f"{i}".encode(), qos=1)
        got = raw.publishes(1.0)
        assert [m.payload for m in got] == [b"0", b"1", b"2"]
        assert all(m.topic == f"{p}/t" and not m.prop(TOPIC_ALIAS) for m in got)
    finally:
        raw.close()


def test_a_message_that_fits_only_without_an_alias_is_delivered_without_one(clients):
    """A new alias costs 3 bytes: a delivery that fits the client's Maximum Packet Size
    exactly without it is sent with its full topic, not dropped (MQTT-3.1.2-24)."""
    topic = unique()
    raw = Raw(5)
    try:
        max_packet = 100
        raw.send(connect(5, unique("mps"), props=[(TOPIC_ALIAS_MAXIMUM, 16), (0x27, max_packet)]))
        raw.expect(CONNACK)
        raw.send(subscribe(5, 1, [(topic, 1)]))
        raw.expect(SUBACK)
        # 1 + 1 (length) + 2 + topic + 2 (packet id) + 1 (no properties) + payload.
        payload = b"x" * (max_packet - 7 - len(topic))
        clients(V5).publish(topic, payload, qos=1)
        got = raw.publishes(1.0)
        assert [(m.topic, m.payload) for m in got] == [(topic, payload)]
        assert not got[0].prop(TOPIC_ALIAS)
    finally:
        raw.close()
