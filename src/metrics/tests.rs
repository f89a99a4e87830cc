use std::time::Duration;

use super::*;

/// The value of the series `series` (name with its labels, as encoded) in `text`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.split(' ').next()?.parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn recorded_values_are_encoded_with_their_types_and_labels() {
    let m = Metrics::new();
    m.flush_finished(Trigger::Hook, Outcome::Durable, Duration::from_millis(200));
    m.flush_finished(Trigger::Hook, Outcome::Durable, Duration::from_secs(7));
    m.flush_finished(Trigger::Event, Outcome::Failed, Duration::from_millis(3));
    m.flush_requested(Trigger::Reconcile);
    m.sync_finished(Trigger::Remove, Duration::from_secs(2));
    m.restore_finished(RestoreSource::Outbox, Duration::from_millis(40));
    m.upload_bytes.inc_by(4096);
    m.download_bytes.inc_by(512);
    m.error(ErrorKind::HookProtocol);
    m.set_outbox(3, 1);
    m.events_connected.set(1);
    let t = m.encode(Format::Prometheus).unwrap();

    for (name, kind) in [
        ("zlayer_flush_duration_seconds", "histogram"),
        ("zlayer_sync_duration_seconds", "histogram"),
        ("zlayer_restore_duration_seconds", "histogram"),
        ("zlayer_upload_bytes_total", "counter"),
        ("zlayer_download_bytes_total", "counter"),
        ("zlayer_errors_total", "counter"),
        ("zlayer_flush_requests_total", "counter"),
        ("zlayer_outbox_layers", "gauge"),
        ("zlayer_dead_letter_layers", "gauge"),
        ("zlayer_flush_queue", "gauge"),
        ("zlayer_last_successful_flush_timestamp_seconds", "gauge"),
        ("zlayer_events_connected", "gauge"),
    ] {
        assert!(
            t.contains(&format!("\n# TYPE {name} {kind}\n")),
            "{name} is not a {kind}:\n{t}"
        );
    }

    // Histogram buckets are cumulative and end in +Inf; sum and count follow.
    let hook = r#"trigger="hook",outcome="durable""#;
    let bucket = |le: &str| format!("zlayer_flush_duration_seconds_bucket{{{hook},le=\"{le}\"}}");
    assert_eq!(must(&t, &bucket("0.1")), 0.0);
    assert_eq!(must(&t, &bucket("0.25")), 1.0);
    assert_eq!(must(&t, &bucket("10")), 2.0);
    assert_eq!(must(&t, &bucket("+Inf")), 2.0);
    assert_eq!(
        must(
            &t,
            &format!("zlayer_flush_duration_seconds_count{{{hook}}}")
        ),
        2.0
    );
    let sum = must(&t, &format!("zlayer_flush_duration_seconds_sum{{{hook}}}"));
    assert!((sum - 7.2).abs() < 1e-9, "{sum}");
    assert_eq!(
        must(
            &t,
            r#"zlayer_sync_duration_seconds_count{trigger="remove"}"#
        ),
        1.0
    );
    assert_eq!(
        must(
            &t,
            r#"zlayer_restore_duration_seconds_bucket{source="outbox",le="0.05"}"#
        ),
        1.0
    );

    assert_eq!(must(&t, "zlayer_upload_bytes_total"), 4096.0);
    assert_eq!(must(&t, "zlayer_download_bytes_total"), 512.0);
    // A failed flush counts as a flush error; every kind and trigger exists from the start.
    assert_eq!(must(&t, r#"zlayer_errors_total{kind="flush"}"#), 1.0);
    assert_eq!(
        must(&t, r#"zlayer_errors_total{kind="hook_protocol"}"#),
        1.0
    );
    assert_eq!(must(&t, r#"zlayer_errors_total{kind="lookup"}"#), 0.0);
    assert_eq!(
        must(&t, r#"zlayer_flush_requests_total{trigger="reconcile"}"#),
        1.0
    );
    assert_eq!(
        must(&t, r#"zlayer_flush_requests_total{trigger="api"}"#),
        0.0
    );
    assert_eq!(must(&t, "zlayer_outbox_layers"), 3.0);
    assert_eq!(must(&t, "zlayer_dead_letter_layers"), 1.0);
    assert_eq!(must(&t, "zlayer_events_connected"), 1.0);
    // Only a durable or unchanged flush sets the timestamp: it is now-ish, in seconds.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = must(&t, "zlayer_last_successful_flush_timestamp_seconds");
    assert!((now - last).abs() < 60.0, "{last} vs {now}");
}

#[test]
fn a_failed_flush_leaves_the_success_timestamp_alone() {
    let m = Metrics::new();
    m.flush_finished(Trigger::Cli, Outcome::Failed, Duration::from_secs(1));
    let t = m.encode(Format::Prometheus).unwrap();
    assert_eq!(
        must(&t, "zlayer_last_successful_flush_timestamp_seconds"),
        0.0
    );
    m.flush_finished(Trigger::Cli, Outcome::Unchanged, Duration::from_millis(1));
    let t = m.encode(Format::Prometheus).unwrap();
    assert!(must(&t, "zlayer_last_successful_flush_timestamp_seconds") > 0.0);
}

#[test]
fn openmetrics_has_units_and_ends_with_eof() {
    let m = Metrics::new();
    m.upload_bytes.inc_by(1);
    let t = m.encode(Format::OpenMetrics).unwrap();
    assert!(t.contains("# TYPE zlayer_upload_bytes counter\n"), "{t}");
    assert!(t.contains("# UNIT zlayer_upload_bytes bytes\n"), "{t}");
    assert_eq!(must(&t, "zlayer_upload_bytes_total"), 1.0);
    assert!(t.ends_with("# EOF\n"), "{t}");
}

#[test]
fn the_accept_header_picks_the_format() {
    assert_eq!(Format::from_accept(None), Format::Prometheus);
    assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
    let prometheus =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4";
    assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
    assert!(Format::Prometheus.content_type().starts_with("text/plain"));
}

#[test]
fn the_free_functions_record_into_the_global_registry() {
    // Other tests of this process record too: compare before and after.
    let before = encode(Format::Prometheus).unwrap();
    let series = r#"zlayer_errors_total{kind="lookup"}"#;
    error(ErrorKind::Lookup);
    downloaded(10);
    let after = encode(Format::Prometheus).unwrap();
    assert!(must(&after, series) >= must(&before, series) + 1.0);
    assert!(
        must(&after, "zlayer_download_bytes_total")
            >= must(&before, "zlayer_download_bytes_total") + 10.0
    );
}

#[tokio::test]
async fn the_endpoint_serves_metrics_and_404_elsewhere() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone().cancelled_owned()));
    let get = |path: &str, extra: &str| {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    let ok = get("/metrics", "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("content-type: text/plain; version=0.0.4"),
        "{ok}"
    );
    assert!(ok.contains("# TYPE zlayer_outbox_layers gauge"), "{ok}");
    let om = get("/metrics", "Accept: application/openmetrics-text\r\n").await;
    assert!(om.contains("application/openmetrics-text"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    let missing = get("/", "").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(post.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");

    stop.cancel();
    task.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}

#[tokio::test]
async fn binding_a_used_address_names_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = MetricsServer::bind(addr).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// Every metric the shipped Grafana dashboard queries exists under that name.
#[test]
fn the_grafana_dashboard_queries_only_metrics_that_exist() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/grafana/zlayer-storage.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "too few queries found: {exprs:?}");

    // A labelled histogram is only encoded once it has a series.
    let m = Metrics::new();
    m.flush_finished(Trigger::Api, Outcome::Durable, Duration::ZERO);
    m.sync_finished(Trigger::Api, Duration::ZERO);
    m.restore_finished(RestoreSource::Store, Duration::ZERO);
    let families: Vec<String> = m
        .encode(Format::Prometheus)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect();
    let mut used = std::collections::BTreeSet::new();
    let metric_name = regex::Regex::new(r"zlayer_[a-z_]+").unwrap();
    for expr in &exprs {
        for name in metric_name.find_iter(expr) {
            let name = name.as_str();
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| families.iter().any(|x| x == f))
                .unwrap_or(name);
            assert!(
                families.iter().any(|f| f == family),
                "the dashboard queries {name}, which is not a metric ({expr})"
            );
            used.insert(family.to_string());
        }
    }
    let unused: Vec<&String> = families.iter().filter(|f| !used.contains(*f)).collect();
    assert!(
        unused.is_empty(),
        "metrics missing from the dashboard: {unused:?}"
    );
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == "expr" => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn trigger_names_round_trip_and_unknown_ones_are_refused() {
    for t in Trigger::ALL {
        assert_eq!(Trigger::from_name(t.as_str()), Some(t));
    }
    assert_eq!(Trigger::from_name("nri"), None);
    assert_eq!(Trigger::from_name("Hook"), None);
    assert_eq!(Outcome::succeeded(true), Outcome::Unchanged);
    assert_eq!(Outcome::succeeded(false), Outcome::Durable);
}
