use super::*;

fn node(n: &str) -> Identity {
    Identity::Node(n.to_string())
}

fn operator(n: &str) -> Identity {
    Identity::Operator(n.to_string())
}

fn hello(purpose: Purpose, from: &str, epoch: u64, active: &str) -> Hello {
    Hello {
        protocol: proto::PROTOCOL_VERSION,
        version: "test".to_string(),
        node: from.to_string(),
        epoch,
        active: active.to_string(),
        config_hash: String::new(),
        purpose,
        owners: false,
        compress: warmspare_shared::compress::Compress::Auto,
    }
}

fn role(epoch: u64, active: &str) -> RoleState {
    RoleState {
        epoch,
        active: active.to_string(),
    }
}

/// What a verdict is, without its reason text.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Accept,
    Adopt(u64, &'static str),
    Stale(u64, &'static str),
    Refuse,
}

fn kind(a: &Admission) -> String {
    match a {
        Admission::Accept => "accept".into(),
        Admission::Adopt(r) => format!("adopt {} {}", r.epoch, r.active),
        Admission::Stale(r) => format!("stale {} {}", r.epoch, r.active),
        Admission::Refuse(_) => "refuse".into(),
    }
}

fn want(k: Kind) -> String {
    match k {
        Kind::Accept => "accept".into(),
        Kind::Adopt(e, a) => format!("adopt {e} {a}"),
        Kind::Stale(e, a) => format!("stale {e} {a}"),
        Kind::Refuse => "refuse".into(),
    }
}

#[test]
fn the_admission_table() {
    use Purpose::{Control, Probe, Replicate};
    // (case, who, hello, this node's role, verdict)
    let rows: Vec<(&str, Identity, Hello, RoleState, Kind)> = vec![
        (
            "a probe from anyone",
            node("c"),
            hello(Probe, "c", 0, ""),
            role(5, "a"),
            Kind::Accept,
        ),
        (
            "an operator's control",
            operator("ops"),
            hello(Control, "ops", 0, ""),
            role(5, "a"),
            Kind::Accept,
        ),
        (
            "control from a node",
            node("a"),
            hello(Control, "a", 5, "a"),
            role(5, "a"),
            Kind::Refuse,
        ),
        (
            "a push under another node's name",
            node("b"),
            hello(Replicate, "a", 5, "a"),
            role(5, "a"),
            Kind::Refuse,
        ),
        (
            "a push from an operator",
            operator("ops"),
            hello(Replicate, "a", 5, "a"),
            role(5, "a"),
            Kind::Refuse,
        ),
        (
            "the active pushing at our epoch",
            node("a"),
            hello(Replicate, "a", 5, "a"),
            role(5, "a"),
            Kind::Accept,
        ),
        (
            "a push from an older epoch",
            node("a"),
            hello(Replicate, "a", 4, "a"),
            role(5, "b"),
            Kind::Stale(5, "b"),
        ),
        (
            "an old active at an older epoch",
            node("a"),
            hello(Replicate, "a", 3, "a"),
            role(5, "a"),
            Kind::Stale(5, "a"),
        ),
        (
            "a push from a node not active in its own hello",
            node("a"),
            hello(Replicate, "a", 5, "b"),
            role(5, "b"),
            Kind::Refuse,
        ),
        (
            "a second active at our epoch",
            node("c"),
            hello(Replicate, "c", 5, "c"),
            role(5, "a"),
            Kind::Refuse,
        ),
        (
            "a push from a higher epoch is adopted",
            node("b"),
            hello(Replicate, "b", 6, "b"),
            role(5, "a"),
            Kind::Adopt(6, "b"),
        ),
        (
            "a higher epoch naming another is refused",
            node("b"),
            hello(Replicate, "b", 6, "a"),
            role(5, "a"),
            Kind::Refuse,
        ),
    ];
    for (case, who, h, mine, expected) in rows {
        let got = decide(&who, &h, &mine);
        assert_eq!(kind(&got), want(expected), "{case}");
    }
}

#[test]
fn another_protocol_is_refused_before_anything_else() {
    let mut h = hello(Purpose::Probe, "c", 0, "");
    h.protocol = proto::PROTOCOL_VERSION + 1;
    match decide(&node("c"), &h, &role(1, "a")) {
        Admission::Refuse(why) => assert!(why.contains("is not supported"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn only_a_node_pushing_as_itself_has_its_configuration_compared() {
    assert!(pushes_as_itself(&node("a"), &hello(Purpose::Replicate, "a", 1, "a")));
    assert!(!pushes_as_itself(&node("b"), &hello(Purpose::Replicate, "a", 1, "a")));
    assert!(!pushes_as_itself(&node("a"), &hello(Purpose::Probe, "a", 1, "a")));
    assert!(!pushes_as_itself(
        &operator("a"),
        &hello(Purpose::Replicate, "a", 1, "a")
    ));
}
