//! End-to-end test of the dashboard (`lb run --ui`) in a real browser:
//! Debian's headless chromium driven over WebDriver against a real daemon
//! in network namespaces. The page shows the services and backends that
//! exist; a backend added through the API appears without a reload, and
//! the event log shows its event; a thousand backends are shown a page of
//! 100 rows at a time; every request the page made went to its
//! own listener; the listener changes nothing and answers loopback host
//! names only. A screenshot is saved as `target/dashboard.png`. A busy
//! `--ui` port stops `lb run` with one clear line before anything is
//! attached. Run as root, one at a time:
//! `cargo test -p lb-tests --test e2e_dashboard -- --test-threads=1`.

use std::{io::Read as _, time::Duration};

use lb_harness::{
    browser::Browser,
    lb_binary,
    ops::{free_loopback_port, DaemonFiles},
    output_with_timeout, render_config, require_root, ServiceConfig, Topology,
};

/// How long a change may take to show on the page (the issue asks for two
/// seconds; the page follows the event stream and re-reads at once).
const SHOWS_WITHIN: Duration = Duration::from_secs(2);

/// `GET`s or `POST`s `url` with `host` as the Host header; status and body.
fn http(method: &str, url: &str, host: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let response = match method {
        "GET" => {
            let mut req = agent.get(url);
            if let Some(h) = host {
                req = req.header("host", h);
            }
            req.call()
        }
        _ => agent.post(url).send(""),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let mut body = String::new();
    let _ = response.body_mut().as_reader().read_to_string(&mut body);
    (response.status().as_u16(), body)
}

#[test]
fn the_page_shows_services_backends_and_changes_live() {
    require_root();
    let topo = Topology::new("lbw1", 1);
    let files = DaemonFiles::new(&topo, "ui");
    let vip = format!("{}:80", topo.vip());
    let first = format!("{}:8080", topo.backend_addr(0));
    let added = format!("{}:8081", topo.backend_addr(0));
    files.write_config(&format!(
        "{}\n[docker]\nenabled = false\n",
        render_config(
            &[&topo.client_host_if()],
            &[ServiceConfig::new(
                "web",
                &vip,
                "tcp",
                std::slice::from_ref(&first)
            )]
        )
    ));
    let port = free_loopback_port();
    let ui = format!("127.0.0.1:{port}");
    let _daemon = files.start(&["--ui", &ui]);
    let lb = files.cli();
    let url = format!("http://{ui}/");

    let browser = Browser::start("lbw1");
    browser.goto(&url);
    // The service with its VIP and protocol, and its backend, active.
    let service = browser
        .wait_for(
            "the service web",
            r#"const r = document.querySelector('#services tr[data-service="web"]');
               return r ? r.innerText : null"#,
            Duration::from_secs(10),
        )
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        service.contains(&vip) && service.contains("tcp") && service.contains("1/1"),
        "{service}"
    );
    let row = browser
        .wait_for(
            "the backend",
            &format!(
                r#"const r = document.querySelector('#backends tr[data-backend="web|{first}"]');
                   return r ? r.innerText : null"#
            ),
            SHOWS_WITHIN,
        )
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(row.contains("active") && row.contains("unchecked"), "{row}");
    // The data path's outcome counters are listed.
    let outcomes = browser.eval("return document.querySelectorAll('#counters tbody tr').length");
    assert!(
        outcomes.as_u64().unwrap_or(0) > 5,
        "outcome rows: {outcomes}"
    );
    // The event log has the daemon's start.
    browser.wait_for(
        "the daemon_started event",
        "return document.querySelector('#events [data-kind=daemon_started]') !== null",
        SHOWS_WITHIN,
    );

    // A backend added through the API appears with no reload, and so does
    // its event.
    browser.eval("window.lbTestMarker = 42; return true");
    lb.ok(&["backend", "add", "web", &added]);
    let row = browser
        .wait_for(
            "the added backend",
            &format!(
                r#"const r = document.querySelector('#backends tr[data-backend="web|{added}"]');
                   return r ? r.innerText : null"#
            ),
            SHOWS_WITHIN,
        )
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(row.contains("active"), "{row}");
    let event = browser
        .wait_for(
            "the backend_added event",
            &format!(
                r#"const e = [...document.querySelectorAll('#events [data-kind=backend_added]')]
                     .find((d) => d.innerText.includes('{added}'));
                   return e ? e.innerText : null"#
            ),
            SHOWS_WITHIN,
        )
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(event.contains("api"), "the event says why: {event}");
    assert_eq!(
        browser.eval("return window.lbTestMarker"),
        42,
        "the page was not reloaded"
    );

    // A drain shows as the backend's state.
    lb.ok(&["backend", "drain", "web", &added]);
    browser.wait_for(
        "the drained backend",
        &format!(
            r#"const r = document.querySelector('#backends tr[data-backend="web|{added}"] td.state');
               return r && r.innerText === 'draining'"#
        ),
        SHOWS_WITHIN,
    );
    browser.wait_for(
        "live status",
        "return document.getElementById('livetext').innerText === 'live'",
        SHOWS_WITHIN,
    );

    // A thousand backends more: the table shows them a page at a time.
    let many: Vec<String> = (0..1_000)
        .map(|i| format!("{}:{}", topo.backend_addr(0), 20_000 + i))
        .collect();
    let mut add = vec!["backend", "add", "web"];
    add.extend(many.iter().map(String::as_str));
    lb.ok(&add);
    browser.wait_for(
        "1,002 backends on 11 pages",
        "return document.getElementById('page').innerText.trim() === '1/11 (1002)'",
        Duration::from_secs(5),
    );
    assert_eq!(
        browser.eval("return document.querySelectorAll('#backends tbody tr').length"),
        100,
        "one page of rows"
    );
    // The log keeps its last 500 lines, all of them additions by now.
    browser.wait_for(
        "500 lines of backend_added",
        "return document.querySelectorAll('#events [data-kind=backend_added]').length === 500",
        Duration::from_secs(5),
    );

    // For the README and for a look: target/dashboard.png.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    browser.screenshot(&workspace.join("target/dashboard.png"));

    // Every request the page made went to its own listener.
    let elsewhere = browser.eval(&format!(
        "return performance.getEntriesByType('resource').map((e) => e.name)\
           .filter((n) => !n.startsWith('http://{ui}/'))"
    ));
    assert_eq!(
        elsewhere,
        serde_json::json!([]),
        "requests that left: {elsewhere}"
    );

    // Read-only, and loopback host names only.
    let (status, _) = http("POST", &format!("{url}snapshot"), None);
    assert_eq!(status, 405, "the page's listener changes nothing");
    let (status, body) = http("GET", &format!("{url}snapshot"), Some("evil.example"));
    assert_eq!(status, 421, "{body}");
    let (status, body) = http("GET", &format!("{url}snapshot"), None);
    assert_eq!(status, 200, "{body}");
    let snap: serde_json::Value = serde_json::from_str(&body).expect("a JSON snapshot");
    assert_eq!(snap["services"][0]["name"], "web");
}

#[test]
fn a_busy_ui_port_stops_lb_run_before_anything_is_attached() {
    require_root();
    let topo = Topology::new("lbw2", 1);
    let files = DaemonFiles::new(&topo, "ui-busy");
    files.write_config(&format!(
        "{}\n[docker]\nenabled = false\n",
        render_config(&[&topo.client_host_if()], &[])
    ));
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = busy.local_addr().expect("its address").to_string();
    let s = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_owned();
    let out = output_with_timeout(
        std::process::Command::new(lb_binary()).args([
            "run",
            "--config",
            &s(&files.config),
            "--state",
            &s(&files.state),
            "--socket",
            &s(&files.socket),
            "--ui",
            &addr,
        ]),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("error: binding --ui {addr}: ")) && stderr.contains("in use"),
        "one line naming the option and the cause: {stderr}"
    );
    assert!(
        !files.pins.exists(),
        "nothing was loaded or pinned: {:?}",
        files.pins.listing()
    );
    let bad = output_with_timeout(
        std::process::Command::new(lb_binary()).args([
            "run",
            "--config",
            &s(&files.config),
            "--ui",
            "localhost:http",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an address that is no IP:PORT is a usage error"
    );
}
