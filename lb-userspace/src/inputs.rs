//! Test-only strategies for the property tests of everything that reads
//! outside input (the config file, the API's bodies, Docker's labels), and
//! the property they share: an input is taken, or refused with one clear
//! error, a single non-empty line.

use proptest::{prelude::*, sample::select, test_runner::TestCaseError};

/// Text an operator, a client or a container could send: any Unicode, the
/// control characters that break lines and logs, and edge values of the
/// fields that are read.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[\\x00-\\x7f]{0,12}",
        "[0-9a-z.:@/_-]{0,24}",
        select(vec![
            "",
            " ",
            "\n",
            "\r",
            "a\nb",
            "x\r\ny",
            "\u{0}",
            "\u{2028}",
            "0",
            "-1",
            "1",
            "65535",
            "65536",
            "4294967295",
            "4294967296",
            "18446744073709551616",
            "1e3",
            "web",
            "tcp",
            "udp",
            "198.18.101.1:80",
            "198.18.103.2:8080@2",
            "198.18.103.2",
            "[2001:2::1]:80",
            "unix:///run/docker.sock",
            "tcp://198.18.0.1:2375",
            "eth1",
            "bridge",
            "web:1",
        ])
        .prop_map(String::from),
    ]
}

/// Fails the case unless `message` is one non-empty line.
pub fn one_clear_line(what: &str, message: &str) -> Result<(), TestCaseError> {
    prop_assert!(!message.trim().is_empty(), "{what}: an empty error");
    prop_assert!(
        !message.contains(['\n', '\r', '\u{2028}', '\u{2029}']),
        "{what}: an error of more than one line: {message:?}"
    );
    Ok(())
}
