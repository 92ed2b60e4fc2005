"""Topic filters: wildcards (MQTT 3.1.1 / 5.0 section 4.7), `$` topics, filter validation,
UNSUBSCRIBE, and client identifiers."""

import pytest

import mqttraw
from helpers import QUIET, V5, VERSION_IDS, VERSIONS, unique
from mqttraw import Raw


def topics_of(client, wait=QUIET):
    return sorted(m.topic for m in client.drain(wait))


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_4_7_1_2_multi_level_wildcard_matches_parent_and_children(clients, version):
    """`#` matches any number of levels, including the parent: `a/#` matches `a`."""
    p = unique()
    sub = clients(version)
    assert sub.subscribe(f"{p}/#", 0) == 0
    pub = clients(version)
    for t in [p, f"{p}/a", f"{p}/a/b/c", f"{p}x", f"{p}x/a"]:
        pub.publish(t, b"m")
    assert topics_of(sub) == sorted([p, f"{p}/a", f"{p}/a/b/c"])


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_4_7_1_3_single_level_wildcard_matches_one_level(clients, version):
    """`+` matches exactly one level, including an empty one."""
    p = unique()
    sub = clients(version)
    assert sub.subscribe(f"{p}/+/c", 0) == 0
    assert sub.subscribe(f"{p}/only/+", 0) == 0
    pub = clients(version)
    for t in [f"{p}/b/c", f"{p}//c", f"{p}/b/x/c", f"{p}/c", f"{p}/only/", f"{p}/only", f"{p}/only/a/b"]:
        pub.publish(t, b"m")
    assert topics_of(sub) == sorted([f"{p}/b/c", f"{p}//c", f"{p}/only/"])


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_4_7_2_1_dollar_topics_not_matched_by_leading_wildcards(clients, version):
    """A filter starting with `#` or `+` does not match a topic starting with `$`.

    A server SHOULD keep clients from exchanging messages on `$` topics (4.7.2), so the
    publishes may be refused; a control subscriber that names the topic shows whether
    they went through. Either way the wildcard subscribers must not get them.
    """
    tag = unique("test").replace("-", "")
    dollar_topics = ["$SYS/x", f"${tag}/x"]
    wild = clients(version)
    assert wild.subscribe("#", 0) == 0
    assert wild.subscribe("+/x", 0) == 0
    control = clients(version)
    for t in dollar_topics:
        control.subscribe(t, 0)
    pub = clients(version)
    for t in dollar_topics:
        try:
            pub.publish(t, b"dollar")
        except (AssertionError, ValueError):
            pass  # refused by the server: allowed
    marker = f"{unique()}/x"
    clients(version).publish(marker, b"marker")
    got = [m.topic for m in wild.drain()]
    assert marker in got, "the wildcard subscriber receives ordinary topics"
    assert not [t for t in got if t.startswith("$")], f"$ topics matched a wildcard: {got}"
    # Informative: whether the server let the publishes through at all.
    print("control subscriber got:", [m.topic for m in control.drain(0.2)])


INVALID_FILTERS = ["a/#/b", "a/b#", "a+/b", "#/a", "a/+b", ""]


@pytest.mark.parametrize("version", [4, 5], ids=VERSION_IDS)
@pytest.mark.parametrize("bad", INVALID_FILTERS)
def test_mqtt_4_7_1_invalid_topic_filter_refused(raws, version, bad):
    """A wildcard not alone in its level (4.7.1-1/-2/-3) or an empty filter (4.7.3-1) is
    invalid: the server answers SUBACK 0x80 (3.1.1) / 0x80 or 0x8F (5.0) for it, or treats
    the packet as malformed and closes the connection (MQTT 5: after DISCONNECT 0x81/0x82/
    0x8F) — never a grant."""
    r = raws(version)
    assert r.connect(unique("c"))[1] == 0
    codes = r.subscribe(1, [(bad, 1)])
    if codes is None:
        assert r.closed, "neither SUBACK nor close"
        assert r.disconnect_reason in (None, 0x81, 0x82, 0x8F), f"DISCONNECT {r.disconnect_reason:#x}"
        return
    assert len(codes) == 1
    assert codes[0] in ((0x80,) if version == 4 else (0x80, 0x8F)), f"SUBACK {codes[0]:#x} for {bad!r}"


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_10_4_1_unsubscribe_stops_delivery(clients, version):
    """After UNSUBACK the server stops adding messages for that filter."""
    p = unique()
    sub = clients(version)
    sub.subscribe(f"{p}/t", 1)
    sub.subscribe(f"{p}/keep", 1)
    pub = clients(version)
    pub.publish(f"{p}/t", b"1", qos=1)
    assert sub.expect().payload == b"1"
    assert sub.unsubscribe(f"{p}/t") == 0
    pub.publish(f"{p}/t", b"2", qos=1)
    pub.publish(f"{p}/keep", b"3", qos=1)
    got = [(m.topic, m.payload) for m in sub.drain()]
    assert got == [(f"{p}/keep", b"3")]


def test_mqtt_3_11_3_no_subscription_existed(clients):
    """MQTT 5: UNSUBACK reason 0x11 (No subscription existed) for an unknown filter."""
    p = unique()
    c = clients(V5)
    c.subscribe(f"{p}/a", 0)
    assert c.unsubscribe(f"{p}/a") == 0x00
    assert c.unsubscribe(f"{p}/a") == 0x11
    assert c.unsubscribe(f"{p}/never") == 0x11


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_mqtt_3_1_3_5_client_id_with_spaces_accepted(clients, version):
    """The server MUST accept 1-23 character ids of [0-9a-zA-Z] and MAY accept others
    (3.1.3-5/-6); this server takes the MAY: any UTF-8 id, spaces included."""
    cid = "my client 1"
    c = clients(version, client_id=cid)
    p = unique()
    c.subscribe(f"{p}/t", 0)
    c.publish(f"{p}/t", b"hi")
    assert c.expect().payload == b"hi"
    c.disconnect()


def test_raw_client_sanity():
    """The raw encoder talks to the broker (guards the hand-made packets)."""
    r = Raw(5)
    try:
        present, code = r.connect(unique("c"))
        assert (present, code) == (0, 0)
        r.send(bytes([0xC0, 0]))
        assert r.expect(mqttraw.PINGRESP).type == mqttraw.PINGRESP
    finally:
        r.close()
