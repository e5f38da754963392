use std::time::Duration;

use super::*;

fn change(service: &str) -> Change {
    Change {
        service: Some(service.into()),
        ..Change::new(EventKind::ServiceAdded)
    }
}

fn seqs(events: &[Arc<Event>]) -> Vec<u64> {
    events.iter().map(|e| e.seq).collect()
}

/// A history of `capacity` after `n` events, alternately of services a and b.
fn history(capacity: usize, n: u64) -> History {
    let mut h = History::new(capacity);
    for i in 0..n {
        h.push(
            change(if i % 2 == 0 { "a" } else { "b" }),
            SystemTime::now(),
        );
    }
    h
}

#[test]
fn times_are_rfc3339_utc() {
    let at = |ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
    assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        at(951_782_400_000),
        "2000-02-29T00:00:00.000Z",
        "a leap day"
    );
    assert_eq!(at(1_764_676_007_123), "2025-12-02T11:46:47.123Z");
    assert_eq!(at(4_102_444_799_000), "2099-12-31T23:59:59.000Z");
}

#[test]
fn the_history_is_bounded_and_numbered_without_holes() {
    let h = history(4, 10);
    assert_eq!(h.last, 10);
    assert_eq!(h.events.len(), 4, "only the last 4 are kept");
    assert_eq!(h.first(), 7);
    assert_eq!(
        seqs(&h.events.iter().cloned().collect::<Vec<_>>()),
        [7, 8, 9, 10]
    );
    assert_eq!(history(4, 0).first(), 1, "an empty history starts at 1");
}

#[test]
fn a_resume_inside_the_history_misses_nothing() {
    let h = history(4, 10);
    let r = h.read_after(8, 100);
    assert!(r.gap.is_none());
    assert_eq!(seqs(&r.events), [9, 10]);
    assert_eq!(r.cursor, 10);
    let r = h.read_after(6, 100);
    assert!(
        r.gap.is_none(),
        "6 is the last one gone: 7 on are all there"
    );
    assert_eq!(seqs(&r.events), [7, 8, 9, 10]);
    let r = h.read_after(10, 100);
    assert!(r.gap.is_none() && r.events.is_empty());
    assert_eq!(r.cursor, 10);
    let whole = history(8, 5).read_after(0, 100);
    assert!(whole.gap.is_none(), "since=0 with nothing lost yet");
    assert_eq!(seqs(&whole.events), [1, 2, 3, 4, 5]);
}

#[test]
fn a_resume_before_the_history_says_what_it_missed() {
    let h = history(4, 10);
    let r = h.read_after(2, 100);
    let gap = r.gap.expect("a gap line first");
    assert_eq!(gap.change.kind, EventKind::Gap);
    assert_eq!(
        (gap.change.missed_from, gap.change.missed_to),
        (Some(3), Some(6))
    );
    assert_eq!(gap.seq, 6, "numbered as the last event it stands for");
    assert!(gap.change.detail.unwrap().contains("events 3 to 6"));
    assert_eq!(seqs(&r.events), [7, 8, 9, 10]);
}

#[test]
fn a_resume_past_the_last_event_is_a_restarted_daemon() {
    let h = history(4, 3);
    let r = h.read_after(50, 100);
    let gap = r.gap.expect("a gap line first");
    assert_eq!(gap.change.kind, EventKind::Gap);
    assert_eq!(gap.change.missed_from, None, "what was missed is unknown");
    assert!(gap.change.detail.unwrap().contains("restarted"));
    assert_eq!(seqs(&r.events), [1, 2, 3], "from the oldest kept");
}

#[test]
fn reads_come_in_bounded_batches() {
    let h = history(100, 10);
    let r = h.read_after(0, 4);
    assert_eq!(seqs(&r.events), [1, 2, 3, 4]);
    let r = h.read_after(r.cursor, 4);
    assert_eq!(seqs(&r.events), [5, 6, 7, 8]);
}

/// The next event of `sub`, within a second.
async fn next(sub: &mut Subscription) -> Option<Arc<Event>> {
    tokio::time::timeout(Duration::from_secs(1), sub.next())
        .await
        .expect("an event or the end within a second")
}

#[tokio::test]
async fn a_reader_follows_filters_and_ends_when_the_log_closes() {
    let log = EventLog::new(16);
    log.emit(change("a"));
    let mut live = log.subscribe(None, None);
    let mut only_b = log.subscribe(Some(0), Some("b".into()));
    log.emit(change("b"));
    log.emit(change("a"));
    log.emit(Change::new(EventKind::DockerConnected));
    assert_eq!(next(&mut live).await.unwrap().seq, 2, "from now on");
    assert_eq!(next(&mut live).await.unwrap().seq, 3);
    assert_eq!(next(&mut live).await.unwrap().seq, 4);
    let b = next(&mut only_b).await.unwrap();
    assert_eq!((b.seq, b.change.service.as_deref()), (2, Some("b")));
    let d = next(&mut only_b).await.unwrap();
    assert_eq!(
        (d.seq, d.change.kind),
        (4, EventKind::DockerConnected),
        "events about no service pass any filter"
    );
    // A reader waiting for the next event is woken by it.
    let waiting = tokio::spawn(async move { next(&mut live).await.map(|e| e.seq) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.emit(change("a"));
    assert_eq!(waiting.await.unwrap(), Some(5));
    log.close();
    assert_eq!(next(&mut only_b).await, None, "closed, nothing left for b");
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_a_gap_then_goes_on() {
    let log = EventLog::new(4);
    let mut slow = log.subscribe(Some(0), None);
    for _ in 0..10 {
        // Never waits for the reader.
        log.emit(change("a"));
    }
    let gap = next(&mut slow).await.unwrap();
    assert_eq!(gap.change.kind, EventKind::Gap);
    assert_eq!(
        (gap.change.missed_from, gap.change.missed_to),
        (Some(1), Some(6))
    );
    for want in 7..=10 {
        assert_eq!(next(&mut slow).await.unwrap().seq, want);
    }
}

fn backend(state: BackendState, container: Option<&str>) -> BackendMark {
    BackendMark {
        state,
        weight: 1,
        container: container.map(str::to_owned),
        down_why: (state == BackendState::Down).then_some(Reason::HealthCheck),
    }
}

fn service(origin: Origin, backends: &[(&str, BackendMark)]) -> ServiceMark {
    ServiceMark {
        vip: "198.18.0.10:80".into(),
        protocol: Protocol::Tcp,
        origin,
        backends: backends
            .iter()
            .map(|(a, b)| (a.parse().unwrap(), b.clone()))
            .collect(),
    }
}

fn kinds(changes: &[Change]) -> Vec<(EventKind, Option<&str>, Option<Reason>)> {
    changes
        .iter()
        .map(|c| (c.kind, c.backend.as_deref(), c.reason))
        .collect()
}

#[test]
fn diff_names_each_change_with_its_reason() {
    use BackendState::*;
    let none = HashMap::new();
    let api = Cause {
        default: Reason::Api,
        docker: &none,
    };
    let a = "198.18.1.1:80";
    let b = "198.18.1.2:80";
    let before: Marks = [(
        "web".to_owned(),
        service(Origin::Api, &[(a, backend(Active, None))]),
    )]
    .into();
    let added: Marks = [(
        "web".to_owned(),
        service(
            Origin::Api,
            &[(a, backend(Draining, None)), (b, backend(Active, None))],
        ),
    )]
    .into();
    assert_eq!(
        kinds(&diff(&before, &added, &api)),
        [
            (EventKind::BackendDraining, Some(a), Some(Reason::Api)),
            (EventKind::BackendAdded, Some(b), Some(Reason::Api)),
        ]
    );
    assert!(diff(&added, &added, &api).is_empty(), "no change, no event");

    // A health check takes one down: the reason is what took it down.
    let health = Cause {
        default: Reason::HealthCheck,
        docker: &none,
    };
    let down: Marks = [(
        "web".to_owned(),
        service(
            Origin::Api,
            &[(a, backend(Draining, None)), (b, backend(Down, None))],
        ),
    )]
    .into();
    assert_eq!(
        kinds(&diff(&added, &down, &health)),
        [(EventKind::BackendDown, Some(b), Some(Reason::HealthCheck))]
    );
    assert_eq!(
        kinds(&diff(&down, &added, &health)),
        [(EventKind::BackendUp, Some(b), Some(Reason::HealthCheck))]
    );

    // Removing the service removes its backends first.
    let gone = diff(&added, &Marks::new(), &api);
    assert_eq!(
        kinds(&gone),
        [
            (EventKind::BackendRemoved, Some(a), Some(Reason::Api)),
            (EventKind::BackendRemoved, Some(b), Some(Reason::Api)),
            (EventKind::ServiceRemoved, None, Some(Reason::Api)),
        ]
    );
    assert_eq!(gone[2].vip.as_deref(), Some("198.18.0.10:80"));
}

#[test]
fn diff_gives_containers_their_docker_event_and_start_its_origin() {
    use BackendState::*;
    let docker: HashMap<String, Reason> = [("web-1".to_owned(), Reason::DockerPause)].into();
    let cause = Cause {
        default: Reason::Api,
        docker: &docker,
    };
    let a = "198.19.0.2:80";
    let before: Marks = [(
        "web".to_owned(),
        service(Origin::Config, &[(a, backend(Active, Some("web-1")))]),
    )]
    .into();
    let after: Marks = [(
        "web".to_owned(),
        service(Origin::Config, &[(a, backend(Draining, Some("web-1")))]),
    )]
    .into();
    let changes = diff(&before, &after, &cause);
    assert_eq!(
        kinds(&changes),
        [(
            EventKind::BackendDraining,
            Some(a),
            Some(Reason::DockerPause)
        )]
    );
    assert_eq!(changes[0].container.as_deref(), Some("web-1"));

    // At start, a config service is the config's, an API one the API's.
    let none = HashMap::new();
    let start = Cause {
        default: Reason::Config,
        docker: &none,
    };
    let both: Marks = [
        ("a".to_owned(), service(Origin::Config, &[])),
        ("b".to_owned(), service(Origin::Api, &[])),
    ]
    .into();
    let changes = diff(&Marks::new(), &both, &start);
    assert_eq!(
        changes.iter().map(|c| c.reason).collect::<Vec<_>>(),
        [Some(Reason::Config), Some(Reason::Api)]
    );
}

#[test]
fn events_serialise_as_one_flat_object() {
    let log = EventLog::new(4);
    let e = log.emit(Change {
        service: Some("web".into()),
        backend: Some("198.18.1.1:80".into()),
        state: Some(BackendState::Down),
        reason: Some(Reason::HealthCheck),
        ..Change::new(EventKind::BackendDown)
    });
    let line = serde_json::to_string(&*e).unwrap();
    assert!(
        line.starts_with(r#"{"seq":1,"time":""#),
        "seq and time first: {line}"
    );
    assert!(
        line.ends_with(
            r#""kind":"backend_down","service":"web","backend":"198.18.1.1:80","state":"down","reason":"health_check"}"#
        ),
        "{line}"
    );
    let back: Event = serde_json::from_str(&line).unwrap();
    assert_eq!(back, *e);
}
