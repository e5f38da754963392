//! The quick start's demo, in its short mode: it checks its own output
//! (every container served, no request failed while one was stopped) and
//! cleans up after itself. Run as root: `cargo test -p lb-tests --test demo
//! -- --test-threads=1`.

use lb_harness::{demo, require_root};

#[test]
fn the_docker_demo_spreads_requests_and_fails_none() {
    require_root();
    assert!(demo::docker(60), "the Docker demo failed: see its output");
}

#[test]
fn the_namespace_demo_spreads_requests_and_fails_none() {
    require_root();
    assert!(demo::netns(60), "the namespace demo failed: see its output");
}
