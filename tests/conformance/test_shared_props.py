"""MQTT 5 shared subscriptions (section 4.8.2) and the PUBLISH properties a server
forwards unaltered (section 3.3.2.3)."""

import pytest

from helpers import V5, publish_props, unique


def test_mqtt_4_8_2_shared_subscription_each_message_once_per_group(clients):
    """`$share/g/t`: each message goes to exactly one member of the group; with two
    members both get some (round robin or similar); a non-shared subscriber gets all."""
    p = unique()
    group = unique("g").replace("-", "")
    a = clients(V5)
    b = clients(V5)
    assert a.subscribe(f"$share/{group}/{p}/t", 1) == 1
    assert b.subscribe(f"$share/{group}/{p}/t", 1) == 1
    plain = clients(V5)
    plain.subscribe(f"{p}/t", 1)
    pub = clients(V5)
    n = 20
    for i in range(n):
        pub.publish(f"{p}/t", f"{i}".encode(), qos=1)
    got_a = [int(m.payload) for m in a.drain()]
    got_b = [int(m.payload) for m in b.drain()]
    assert sorted(got_a + got_b) == list(range(n)), (got_a, got_b)
    assert got_a and got_b, f"one member got everything: {got_a} / {got_b}"
    assert sorted(int(m.payload) for m in plain.collect(n)) == list(range(n))
    for m in a.drain(0.1) + b.drain(0.1):
        raise AssertionError(f"extra copy {m.payload!r}")


def test_mqtt_4_8_2_shared_subscription_topic_is_the_published_one(clients):
    """A message delivered through a shared subscription carries the published topic."""
    p = unique()
    s = clients(V5)
    s.subscribe(f"$share/grp/{p}/+", 1)
    clients(V5).publish(f"{p}/x", b"m", qos=1)
    assert s.expect().topic == f"{p}/x"


def relay(clients, props, qos=1):
    p = unique()
    s = clients(V5)
    s.subscribe(f"{p}/t", qos)
    clients(V5).publish(f"{p}/t", b"{}", qos=qos, properties=props)
    return s.expect()


def test_mqtt_3_3_2_18_user_properties_forwarded_in_order(clients):
    pairs = [("b", "1"), ("a", "2"), ("b", "3"), ("z", ""), ("ключ", "значение")]
    m = relay(clients, publish_props(UserProperty=pairs))
    assert m.properties.UserProperty == pairs


def test_mqtt_3_3_2_20_content_type_forwarded(clients):
    m = relay(clients, publish_props(ContentType="application/json; charset=utf-8"))
    assert m.properties.ContentType == "application/json; charset=utf-8"


@pytest.mark.parametrize("indicator", [0, 1])
def test_mqtt_3_3_2_4_payload_format_indicator_forwarded(clients, indicator):
    m = relay(clients, publish_props(PayloadFormatIndicator=indicator))
    assert getattr(m.properties, "PayloadFormatIndicator", 0) == indicator


def test_mqtt_3_3_2_15_response_topic_forwarded(clients):
    m = relay(clients, publish_props(ResponseTopic="reply/here"))
    assert m.properties.ResponseTopic == "reply/here"


def test_mqtt_3_3_2_16_correlation_data_forwarded(clients):
    data = bytes(range(256))
    m = relay(clients, publish_props(CorrelationData=data))
    assert m.properties.CorrelationData == data


def test_mqtt_3_3_2_all_properties_together_qos0(clients):
    props = publish_props(
        UserProperty=[("k", "v")],
        ContentType="text/plain",
        PayloadFormatIndicator=1,
        ResponseTopic="r/t",
        CorrelationData=b"\x00\x01",
    )
    m = relay(clients, props, qos=0)
    assert m.properties.UserProperty == [("k", "v")]
    assert (m.properties.ContentType, m.properties.PayloadFormatIndicator) == ("text/plain", 1)
    assert (m.properties.ResponseTopic, m.properties.CorrelationData) == ("r/t", b"\x00\x01")
