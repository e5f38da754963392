//! `lb-demo`, run by `cargo xtask demo`: the quick start (see
//! `lb_harness::demo`). `--netns` runs the namespace demo instead of the
//! Docker one; `--short` sends fewer requests (as the tests do).

use lb_harness::{demo, require_root};

fn main() {
    require_root();
    let (mut netns, mut requests) = (false, 300);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--netns" => netns = true,
            "--short" => requests = 60,
            other => {
                eprintln!("lb-demo: unknown argument {other:?} (--netns, --short)");
                std::process::exit(2);
            }
        }
    }
    let ok = if netns {
        demo::netns(requests)
    } else {
        demo::docker(requests)
    };
    if !ok {
        eprintln!("demo FAILED: see above");
        std::process::exit(1);
    }
    println!("demo ok");
}
