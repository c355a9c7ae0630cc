//! `warmsparectl`, as an operator runs it.

use std::process::Command;

use warmspare_tests::bin;

#[test]
fn demo_runs_a_pair_and_exits_zero() {
    let out = Command::new(bin("warmsparectl"))
        .args(["demo", "--certs", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("identical on masterb").count(), 2, "{text}");
    assert!(text.contains("excluded"), "{text}");
}
