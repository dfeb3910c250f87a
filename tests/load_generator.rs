//! multi_client's in-process load generator against a real loopback zmq_server: the sweep
//! and its stability rule, the open loop's latency accounting against a server too slow for
//! the rate, and the server's metrics endpoint and resources.csv.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use common::{model, run, temp_dir, zmq_server};

fn multi_client(port: u16, folder: &Path, extra: &[&str]) -> String {
    let port = port.to_string();
    let mut args = vec![
        "--host",
        "127.0.0.1",
        "-p",
        &port,
        "--no-pin",
        "-s",
        "-f",
        folder.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, out) = run(env!("CARGO_BIN_EXE_multi_client"), &args);
    assert!(ok, "multi_client failed: {out}");
    out
}

/// load_summary.csv as one map (column -> value) per level.
fn summary(folder: &Path) -> Vec<HashMap<String, String>> {
    let text = std::fs::read_to_string(folder.join("load_summary.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

fn num(row: &HashMap<String, String>, key: &str) -> f64 {
    row[key]
        .parse()
        .unwrap_or_else(|_| panic!("{key} = {:?} in {row:?}", row[key]))
}

#[test]
fn a_concurrency_sweep_reports_every_level_stable_or_not() {
    let server = zmq_server(&model("resnet_tiny"), &[]);
    let common = [
        "-t",
        "6",
        "--payload-size",
        "64",
        "-c",
        "2",
        "--depth",
        "2",
        "--concurrency-range",
        "1:3:2",
        "--measurement-request-count",
        "200",
    ];
    // Any three windows with replies are within a million percent of each other: stable at
    // the third window.
    let lenient = temp_dir("load-stable");
    let mut args = common.to_vec();
    args.extend(["--max-trials", "5", "--stability-percentage", "1000000"]);
    let out = multi_client(server.port, &lenient, &args);
    let rows = summary(&lenient);
    assert_eq!(rows.len(), 2, "{out}");
    for (row, level) in rows.iter().zip(["1", "3"]) {
        assert_eq!(
            (row["level_kind"].as_str(), row["level"].as_str()),
            ("concurrency", level)
        );
        assert_eq!(
            (row["stable"].as_str(), row["trials"].as_str()),
            ("true", "3"),
            "{out}"
        );
        // Three windows of at least 200 finished requests each, none failed.
        assert!(num(row, "requests") >= 600.0, "{row:?}");
        assert_eq!(num(row, "errors"), 0.0, "{row:?}");
        assert!(num(row, "throughput_rps") > 0.0 && num(row, "p99_us") >= num(row, "p50_us"));
        assert!(num(row, "client_cpu_s_per_1000") > 0.0, "{row:?}");
    }
    let logged = std::fs::read_to_string(lenient.join("requests.csv")).unwrap();
    assert!(logged.lines().count() > 1200, "{}", logged.lines().count());
    let run_json = std::fs::read_to_string(lenient.join("run.json")).unwrap();
    for key in [
        "\"role\": \"multi_client\"",
        "\"task\": \"echo\"",
        "\"payload_bytes\": 64",
        "\"requests.csv\": {\"schema\": 2}",
    ] {
        assert!(run_json.contains(key), "{key} not in {run_json}");
    }

    // 0%: max/min must be exactly 1 for throughput and latency: never met, so each level
    // runs all its trials and is reported unstable, not dropped.
    let strict = temp_dir("load-unstable");
    let mut args = common.to_vec();
    args.extend(["--max-trials", "4", "--stability-percentage", "0"]);
    let out = multi_client(server.port, &strict, &args);
    let rows = summary(&strict);
    assert_eq!(rows.len(), 2, "{out}");
    for row in &rows {
        assert_eq!(
            (row["stable"].as_str(), row["trials"].as_str()),
            ("false", "4"),
            "{out}"
        );
        assert!(num(row, "requests") >= 600.0, "{row:?}");
    }
    assert_eq!(out.matches("UNSTABLE").count(), 2, "{out}");
    server.stop();
}

#[test]
fn the_open_loop_counts_latency_from_the_intended_send_time() {
    // One connection, one request in flight, 2000 req/s of inference: the server takes
    // milliseconds per request, so sends fall ever further behind their schedule. A client
    // timing from its actual sends (coordinated omission) would report about the service
    // time; ours must include the wait.
    let server = zmq_server(&model("resnet_tiny"), &[]);
    let folder = temp_dir("load-rate");
    let out = multi_client(
        server.port,
        &folder,
        &[
            "-t",
            "4",
            "-c",
            "1",
            "--depth",
            "1",
            "--request-rate-range",
            "2000",
            "--measurement-request-count",
            "10",
            "--max-trials",
            "3",
            "--stability-percentage",
            "1000000",
        ],
    );
    let rows = summary(&folder);
    assert_eq!(rows.len(), 1, "{out}");
    let r = &rows[0];
    assert_eq!(r["level_kind"], "request_rate");
    let service: f64 = ["queue_us", "decode_us", "preprocess_us", "infer_us"]
        .iter()
        .map(|k| num(r, k))
        .sum();
    let (avg, lag) = (num(r, "avg_us"), num(r, "send_lag_us"));
    assert!(service > 0.0, "{r:?}");
    assert!(num(r, "late_sends") >= 20.0, "{r:?}");
    assert!(
        lag > 3.0 * service,
        "send lag {lag} us vs service {service} us: {out}"
    );
    assert!(
        avg >= lag + service * 0.5,
        "avg {avg} us, lag {lag} us, service {service} us"
    );
    // Per request too: the latency holds the send lag, and the lag grows along the run.
    let text = std::fs::read_to_string(folder.join("requests.csv")).unwrap();
    let lags: Vec<(u64, u64)> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[12].parse().unwrap(), f[15].parse().unwrap())
        })
        .collect();
    assert!(lags.len() >= 30, "{}", lags.len());
    assert!(lags.iter().all(|(e2e, lag)| e2e >= lag));
    assert!(lags.last().unwrap().1 > lags[0].1, "{:?}", &lags[..3]);
    server.stop();
}

/// Three windows of `count` 16-byte echoes at concurrency 2 over `connections`, stable at
/// the third.
fn echo_load(service: &common::Service, folder: &Path, connections: &str, count: &str) {
    multi_client(
        service.port,
        folder,
        &[
            "-t",
            "6",
            "--payload-size",
            "16",
            "-c",
            connections,
            "--concurrency-range",
            "2",
            "--measurement-request-count",
            count,
            "--max-trials",
            "3",
            "--stability-percentage",
            "1000000",
        ],
    );
}

/// The port of the `<role> metrics on http://ADDR:PORT/metrics` line a role printed.
fn metrics_port(service: &common::Service) -> u16 {
    let line = service
        .output
        .iter()
        .find(|l| l.contains("metrics on http://"))
        .unwrap_or_else(|| panic!("{:#?}", service.output));
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches("/metrics").parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn scrape(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The Prometheus text's samples: "name{labels}" -> value. Every line must parse.
fn parse_metrics(body: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            assert!(line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "));
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line:?}"));
        out.insert(key.to_string(), value);
    }
    out
}

#[test]
fn the_metrics_endpoint_and_resources_csv_of_a_server() {
    let folder = temp_dir("load-metrics-server");
    let server = zmq_server(
        &model("resnet_tiny"),
        &[
            "--metrics-port",
            "0",
            "--metrics-address",
            "127.0.0.1",
            "-s",
            "-f",
            folder.to_str().unwrap(),
        ],
    );
    let metrics_port = metrics_port(&server);
    let load = temp_dir("load-metrics-client");
    echo_load(&server, &load, "1", "300");
    // A few inferences, answered by the worker: the stage histograms' source.
    multi_client(
        server.port,
        &load,
        &[
            "-t",
            "4",
            "-c",
            "1",
            "--concurrency-range",
            "1",
            "--measurement-request-count",
            "5",
            "--max-trials",
            "3",
            "--stability-percentage",
            "1000000",
        ],
    );
    let reply = scrape(metrics_port, "/metrics");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let m = parse_metrics(body);
    let echoes = m["hacserve_answered_total{task=\"echo\"}"];
    assert!(echoes >= 900.0, "{body}");
    let inferred = m["hacserve_answered_total{task=\"jpeg\"}"];
    assert!(inferred >= 15.0, "{body}");
    let all = echoes + inferred;
    assert_eq!(m["hacserve_requests_total{outcome=\"received\"}"], all);
    assert_eq!(m["hacserve_server_latency_seconds_count"], all);
    assert_eq!(
        m["hacserve_server_latency_seconds_bucket{le=\"+Inf\"}"],
        all
    );
    // Stage histograms count the worker's answers only (echoes skip the workers).
    for stage in ["queue", "decode", "preprocess", "infer"] {
        let count = m[&format!("hacserve_stage_seconds_count{{stage=\"{stage}\"}}")];
        assert_eq!(count, inferred, "{stage}: {body}");
    }
    assert!(
        m["hacserve_stage_seconds_sum{stage=\"infer\"}"] > 0.0,
        "{body}"
    );
    assert_eq!(m["hacserve_in_flight"], 0.0);
    assert!(m["hacserve_cpu_seconds_total{mode=\"user\"}"] > 0.0);
    assert!(m["hacserve_resident_memory_bytes"] > 1e6);
    assert!(scrape(metrics_port, "/nope").starts_with("HTTP/1.1 404"));

    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = server.stop();
    assert!(
        out.iter().any(|l| l.starts_with("zmq_server resources: ")),
        "{out:#?}"
    );
    // resources.csv: a row about every 20 ms (the sampler keeps a fixed rate; a loaded
    // machine may stretch single gaps, not the average).
    let text = std::fs::read_to_string(folder.join("resources.csv")).unwrap();
    let elapsed: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    let span = elapsed.last().unwrap() - elapsed[0];
    let mean_gap_ms = span / (elapsed.len() - 1) as f64 * 1e3;
    assert!(
        span > 0.3 && (15.0..=40.0).contains(&mean_gap_ms),
        "{} rows over {span} s",
        elapsed.len()
    );
    assert!(std::fs::read_to_string(folder.join("run.json"))
        .unwrap()
        .contains("\"role\": \"zmq_server\""));
}

#[test]
fn the_balancer_serves_its_counts_as_metrics() {
    let server = zmq_server(&model("resnet_tiny"), &[]);
    let backend = format!("127.0.0.1:{}", server.port);
    let balancer = common::zmq_balancer(
        &backend,
        &["--metrics-port", "0", "--metrics-address", "127.0.0.1"],
    );
    let metrics_port = metrics_port(&balancer);
    let load = temp_dir("load-metrics-balancer");
    echo_load(&balancer, &load, "2", "100");
    let reply = scrape(metrics_port, "/metrics");
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let m = parse_metrics(body);
    let received = m["hacserve_requests_total{outcome=\"received\"}"];
    assert!(received >= 300.0, "{body}");
    assert_eq!(
        m["hacserve_requests_total{outcome=\"answered\"}"], received,
        "{body}"
    );
    assert_eq!(m["hacserve_in_flight"], 0.0, "{body}");
    assert!(m.contains_key("hacserve_resident_memory_bytes"), "{body}");
    balancer.stop();
    server.stop();
}
