//! rdma_server's entry limits and peer liveness over real RDMA (Soft-RoCE) inside the qemu
//! testbed (tests/testbed/), in ONE VM boot:
//!
//! * `--max-connections 2`: with two clients streaming, a third is refused and prints the
//!   server's reason (exit status 3), and the two streams finish with every request answered;
//! * `--max-pinned-mib 8`: a 4 x 2 MiB ring (16 MiB registered) is refused with the budget
//!   reason, a 65-slot ring with the ring-limit reason;
//! * `--peer-timeout-ms 500`: a client that posts no receives (the server's reply write is
//!   never taken) is disconnected with a log line naming it, and its memory given back; a
//!   client SIGKILLed mid-stream is noticed and freed too; then two clients at once (both
//!   places of the limit) are served;
//! * a second server with the default limits: a steady echo client's round trips while three
//!   clients with 64 x 2 MiB rings connect (256 MiB registered each, the server logs how long
//!   each set-up took) are compared with that set-up time: connection set-up runs on the
//!   connection manager's thread, so it must not stall the receive loop.
//!
//! Without qemu or the testbed kernel it prints `SKIPPED rdma limits in VM: <reason>` to
//! stderr and passes (HACSERVE_TESTBED_REQUIRED=1 turns the skip into a failure).

mod common;

use common::section;
use hacserve_runtime::stats::read_csv;

const SERVER: &str = env!("CARGO_BIN_EXE_rdma_server");
const CLIENT: &str = env!("CARGO_BIN_EXE_rdma_client");

/// Requests of each of the two streams that hold the connection limit: 25-40 s in the VM,
/// long enough to outlast the refused client's start (seconds for a debug binary under TCG).
const STREAM: usize = 15000;

/// The `exit status N` line the script prints at the top of a section.
fn exit_status(text: &str) -> i32 {
    text.lines()
        .find_map(|l| l.strip_prefix("exit status "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit status line in:\n{text}"))
}

/// The value after `key=` on the script's `times` line.
fn time_of(text: &str, key: &str) -> u64 {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn connection_limits_liveness_and_slow_connects_in_the_vm() {
    if !common::testbed_ready("rdma limits in VM") {
        return;
    }
    let model = common::model("resnet_tiny");
    let script = format!(
        r#"set -u
S={server}
C={client}
H="--host 192.0.2.1"
E="-t echo --payload-size 64"
export RUST_BACKTRACE=0
fail=0
# wait_for FILE PATTERN: up to 60 s for PATTERN to show up in FILE.
wait_for() {{ for i in $(seq 1 300); do grep -q "$2" "$1" && return 0; sleep 0.2; done; echo "NOT READY: $1 ($2)"; cat "$1"; return 1; }}
# expect RC NAME CMD...: runs CMD, its section, fails the script unless it exits with RC.
expect() {{ want=$1; name=$2; shift 2; "$@" >/tmp/$name.log 2>&1; rc=$?; [ $rc = $want ] || {{ fail=1; echo "FAILED: $name (exit $rc, $want expected)"; }}; echo "=== $name ==="; echo "exit status $rc"; cat /tmp/$name.log; }}
# finish NAME PID: waits for a background client and prints its section.
finish() {{ wait $2; rc=$?; echo "=== $1 ==="; echo "exit status $rc"; cat /tmp/$1.log; }}
$S --bind-address 192.0.2.1 -i 0 --engine-file {model} --poll-mode block --no-pin --workers 1 \
  --max-connections 2 --max-pinned-mib 8 --peer-timeout-ms 500 >/tmp/server1.log 2>&1 &
SP=$!
wait_for /tmp/server1.log "listening on" || fail=1
# 1. Two streams hold both places; a third client is refused meanwhile.
$C $H $E -r {stream} --client-id 1 >/tmp/stream1.log 2>&1 &
A=$!
$C $H $E -r {stream} --client-id 2 >/tmp/stream2.log 2>&1 &
B=$!
wait_for /tmp/server1.log "client 1 connected" || fail=1
wait_for /tmp/server1.log "client 2 connected" || fail=1
expect 3 over_limit $C $H $E -r 1 --client-id 3
kill -0 $A && kill -0 $B && echo "both streams still running after the refusal"
finish stream1 $A
finish stream2 $B
wait_for /tmp/server1.log "client 1: resources freed" || fail=1
wait_for /tmp/server1.log "client 2: resources freed" || fail=1
# 2. Rings beyond the budget and beyond the ring limit.
expect 3 over_budget $C $H $E -r 1 --client-id 4 --slot-size 2097152 --ring-depth 4
expect 3 ring_too_large $C $H $E -r 1 --client-id 5 --ring-depth 65
# 3. A client whose replies find no receive (WRITE_WITH_IMM: the fast path needs none), then one SIGKILLed mid-stream.
expect 1 no_receives $C $H $E -r 1 --client-id 6 --post-receives 0 --fast-path off --timeout-ms 60000
wait_for /tmp/server1.log "client 6: resources freed" || fail=1
$C $H $E -r 1000000 --client-id 7 -d >/tmp/killed.log 2>&1 &
K=$!
wait_for /tmp/killed.log "request 20: status" || fail=1
kill -KILL $K; wait $K
wait_for /tmp/server1.log "client 7: resources freed" || fail=1
# Both places are free again: two clients at once are served.
$C $H $E -r 50 --client-id 8 >/tmp/after8.log 2>&1 &
A=$!
expect 0 after9 $C $H $E -r 50 --client-id 9
finish after8 $A
kill -TERM $SP; wait $SP; rc=$?
[ $rc = 0 ] || {{ fail=1; echo "FAILED: server 1 exit"; }}
echo "=== server1 ==="; echo "exit status $rc"; cat /tmp/server1.log
# 4. Default limits: slow connects (64 x 2 MiB rings) while a steady client runs.
$S --bind-address 192.0.2.1 -p 20081 -i 0 --engine-file {model} --poll-mode block --no-pin --workers 1 >/tmp/server2.log 2>&1 &
SP=$!
wait_for /tmp/server2.log "listening on" || fail=1
# The steady client must outlast the connects (3 x up to ~10 s under load) whatever this
# machine's speed: a short calibration run sets its request count to ~40 s of round trips.
t0=$(date +%s%N)
$C $H -p 20081 $E -r 2000 --client-id 19 >/tmp/calibrate.log 2>&1 || {{ fail=1; echo "FAILED: calibration"; cat /tmp/calibrate.log; }}
t1=$(date +%s%N)
n=$(( 40000000000 / ((t1 - t0) / 2000 + 1) ))
[ $n -lt 20000 ] && n=20000
[ $n -gt 200000 ] && n=200000
echo "steady requests: $n"
$C $H -p 20081 $E -r $n --client-id 20 -s -f /tmp/steady >/tmp/steady.log 2>&1 &
A=$!
wait_for /tmp/server2.log "client 20 connected" || fail=1
sleep 0.5
start=$(date +%s%N)
for i in 1 2 3; do
  $C $H -p 20081 $E -r 1 --client-id 3$i --slot-size 2097152 --ring-depth 64 >/tmp/big$i.log 2>&1 || {{ fail=1; echo "FAILED: big client $i"; cat /tmp/big$i.log; }}
done
end=$(date +%s%N)
echo "=== times ==="; echo "storm_start=$start storm_end=$end"
finish steady $A
cp /tmp/steady/client_20.csv "$HACSERVE_TESTBED_OUT/" || fail=1
kill -TERM $SP; wait $SP; rc=$?
[ $rc = 0 ] || {{ fail=1; echo "FAILED: server 2 exit"; }}
echo "=== server2 ==="; echo "exit status $rc"; cat /tmp/server2.log
echo "=== end ==="
exit $fail
"#,
        server = SERVER,
        client = CLIENT,
        model = model.display(),
        stream = STREAM,
    );
    let run = common::run_script_in_vm("rdma_limits_in_vm", &script, 500);
    let stdout = &run.stdout;
    assert!(!stdout.contains("panicked"), "a process panicked");
    assert_eq!(run.status, Some(0), "script failed");
    let server = section(stdout, "server1");

    // 1. The connection limit: the third client printed the server's reason; the two
    // streams lost nothing.
    let over = section(stdout, "over_limit");
    assert!(
        over.contains(
            "rdma_client 3: refused by rdma://192.0.2.1:20079: the server is at its connection limit (2 connections, its --max-connections)"
        ),
        "{over}"
    );
    assert!(
        stdout.contains("both streams still running after the refusal"),
        "a stream ended before the refused client tried"
    );
    for id in [1, 2] {
        let s = section(stdout, &format!("stream{id}"));
        assert_eq!(exit_status(s), 0, "{s}");
        assert!(
            s.contains(&format!("{STREAM} requests, 0 errors")),
            "stream {id}: {s}"
        );
    }
    assert!(
        server.contains("client 3: connection refused: the server is at its connection limit"),
        "{server}"
    );

    // 2. The budget and the ring limit.
    let budget = section(stdout, "over_budget");
    assert!(
        budget.contains("rdma_client 4: refused by rdma://192.0.2.1:20079: the ring needs 16385 KiB of pinned memory, 8192 KiB of the server's 8192 KiB are free (its --max-pinned-mib)"),
        "{budget}"
    );
    let ring = section(stdout, "ring_too_large");
    assert!(
        ring.contains("rdma_client 5: refused by rdma://192.0.2.1:20079: ring of 65 x 4096 B exceeds the server's limits (64 x 2097152 B, its --ring-depth / --slot-size)"),
        "{ring}"
    );

    // 3. Liveness: the client that took no reply, named, disconnected and freed; the
    // SIGKILLed one noticed and freed; then both places usable again.
    let stalled = server
        .lines()
        .find(|l| l.contains("client 6: 1 replies unacknowledged for"))
        .unwrap_or_else(|| panic!("no stall line for client 6:\n{server}"));
    assert!(
        stalled.contains("(--peer-timeout-ms 500): it is not taking its replies; disconnecting it"),
        "{stalled}"
    );
    let no_recv = section(stdout, "no_receives");
    assert!(
        no_recv.contains("the server closed the connection"),
        "{no_recv}"
    );
    for want in [
        "client 6 disconnected by the server",
        "client 6: 1 replies posted but never acknowledged, counted undeliverable",
        "client 6: resources freed",
        "client 7 disconnected (RDMA_CM_EVENT_DISCONNECTED)",
        "client 7: resources freed",
    ] {
        assert!(
            server.contains(want),
            "server log: missing {want:?}:\n{server}"
        );
    }
    // Everything given back at the end: the last free leaves nothing in use.
    let last_free = server
        .lines()
        .rfind(|l| l.contains("resources freed"))
        .unwrap_or_else(|| panic!("no free line:\n{server}"));
    assert!(
        last_free.contains("(now 0 of 2 connections, 0.0 of 8 MiB pinned)"),
        "{last_free}"
    );
    for id in [8, 9] {
        let s = section(stdout, &format!("after{id}"));
        assert_eq!(exit_status(s), 0, "{s}");
        assert!(s.contains("50 requests, 0 errors"), "{s}");
    }

    // 4. Slow connects: the server's set-up time of each 256 MiB ring against the steady
    // client's round trips while they happened.
    let server2 = section(stdout, "server2");
    let setups: Vec<f64> = server2
        .lines()
        .filter(|l| l.contains("client 3") && l.contains(" connected: "))
        .filter_map(|l| {
            let at = l.find("set up in ")? + "set up in ".len();
            l[at..].split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        setups.len(),
        3,
        "set-up times of the 3 big clients:\n{server2}"
    );
    let times = section(stdout, "times");
    let (start, end) = (time_of(times, "storm_start"), time_of(times, "storm_end"));
    let steady = section(stdout, "steady");
    assert_eq!(exit_status(steady), 0, "{steady}");
    let wanted: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("steady requests: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the script says how many steady requests it sent");
    assert!(
        steady.contains(&format!("{wanted} requests, 0 errors")),
        "{steady}"
    );
    let records = read_csv(&run.out_dir.join("client_20.csv")).expect("steady client's CSV");
    let rtt_ms = |during: bool| {
        let mut v: Vec<f64> = records
            .iter()
            .filter(|r| (r.client_sent >= start && r.client_received <= end) == during)
            .map(|r| r.e2e_ns as f64 / 1e6)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (calm, storm) = (rtt_ms(false), rtt_ms(true));
    assert!(
        storm.len() >= 20,
        "only {} requests during the connects",
        storm.len()
    );
    let setup_max = setups.iter().cloned().fold(0.0, f64::max);
    let row = |v: &[f64]| {
        format!(
            "{:>6} requests  p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        )
    };
    eprintln!(
        "steady echo client, round trips\n  outside the connects: {}\n  during the connects:  {}\n  server set-up of each 64 x 2 MiB ring: {setups:?} ms",
        row(&calm),
        row(&storm)
    );
    // Set-up inside the receive loop would hold a request for up to the whole set-up.
    assert!(
        setup_max >= 20.0,
        "set-ups of {setups:?} ms are too quick to show anything"
    );
    let storm_max = storm[storm.len() - 1];
    assert!(
        storm_max < setup_max / 2.0,
        "a round trip of {storm_max:.1} ms during set-ups of up to {setup_max} ms: the connects stalled the receive loop"
    );
}
