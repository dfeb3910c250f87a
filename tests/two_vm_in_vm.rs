//! The RDMA roles across two hosts: the two-VM testbed (tests/testbed/run-in-2vm.sh) boots
//! guest a (192.0.2.1: rdma_server, rdma_proxy, zmq_proxy) and guest b (192.0.2.2: the
//! clients), each with its own Soft-RoCE device on its own virtio-net NIC, joined by one
//! virtual Ethernet link; every RoCE packet between a client and a server crosses it.
//!
//! * `rdma_roles_across_the_link`: perftest's ib_write_lat across the link (and, as the peer
//!   figure of the same boot, over rxe's loopback inside guest a), then rdma_client echo
//!   (64 B and the 83774 B image) and full inference with the fast path on and off, straight
//!   to rdma_server and through rdma_proxy, and zmq_client through zmq_proxy; then a client
//!   SIGKILLed mid-stream on the fast path, in event mode and through the zero-copy
//!   rdma_proxy, each followed by a fresh client that must be served in full.
//! * `faults_on_the_link`: tc netem on both guests' NICs (1 ms delay, 1 % loss), then the link
//!   cut under a running client: 100 % loss for 1 s (shorter than the client's 3 s reply
//!   timeout), for 8 s (longer), and b's NIC down for 5 s. Every client must end by itself
//!   before its deadline, and each request it sent be answered, failed with an error, or timed
//!   out, none lost: its answers and the request that stopped it add up to what the server
//!   received. After each cut a fresh client must be served in full.
//!
//! The two sides wait for each other through the shared sync dir (a file "up" once the servers
//! listen, "b-done" when the clients are finished), each wait with a deadline.
//!
//! Without qemu or the testbed kernel it prints `SKIPPED two VMs: <reason>` to stderr and
//! passes (HACSERVE_TESTBED_REQUIRED=1 turns the skip into a failure).

mod common;

use common::{section, stop_line_in, TWO_VM_SH};

const SERVER: &str = env!("CARGO_BIN_EXE_rdma_server");
const RCLIENT: &str = env!("CARGO_BIN_EXE_rdma_client");
const ZCLIENT: &str = env!("CARGO_BIN_EXE_zmq_client");
const ZPROXY: &str = env!("CARGO_BIN_EXE_zmq_proxy");
const RPROXY: &str = env!("CARGO_BIN_EXE_rdma_proxy");

/// The `exit status N` line a step prints at the top of its section.
fn exit_status(text: &str) -> i32 {
    text.lines()
        .find_map(|l| l.strip_prefix("exit status "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit status line in:\n{text}"))
}

/// ib_write_lat's result row: (typical, 99 %) in microseconds.
fn perftest_lat(text: &str) -> (f64, f64) {
    let row = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() >= 9 && w[0] == "2" && w[1].parse::<u64>().is_ok())
        .unwrap_or_else(|| panic!("no ib_write_lat result row in:\n{text}"));
    let num = |i: usize| -> f64 { row[i].parse().unwrap_or_else(|_| panic!("{row:?}")) };
    (num(4), num(7))
}

/// The " top-1: N (name)" line of a client's output.
fn top1(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with(" top-1: "))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no top-1 line in:\n{text}"))
}

/// What one rdma_client run (with -d) says became of its requests.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// `request N: status 0` lines.
    answered: u64,
    /// `request N: status S` with S != 0: the server answered with an error.
    error_replies: u64,
    /// The request that stopped the run with "timed out after ..." (0 or 1).
    timed_out: u64,
    /// The request that stopped the run with another transport error (0 or 1).
    failed: u64,
}

impl Tally {
    /// The requests that reached a verdict: every request the client sent.
    fn sent(&self) -> u64 {
        self.answered + self.error_replies + self.timed_out + self.failed
    }
}

/// Counts a client's requests from its -d lines and checks them against its own summary: the
/// table's "N requests" (or "run stopped after N of M") and its CSV's rows.
fn tally(name: &str, text: &str) -> Tally {
    let mut t = Tally::default();
    for l in text.lines().filter(|l| l.contains("] request ")) {
        if let Some(rest) = l.split(": status ").nth(1) {
            match rest.split_whitespace().next() {
                Some("0") => t.answered += 1,
                Some(_) => t.error_replies += 1,
                None => panic!("{name}: odd line {l:?}"),
            }
        }
    }
    let records = t.answered + t.error_replies;
    if let Some(l) = text.lines().find(|l| l.contains("run stopped after ")) {
        let after: u64 = l
            .split("run stopped after ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {l:?}"));
        assert_eq!(
            after, records,
            "{name}: its -d lines and its summary differ"
        );
        if l.contains("timed out after") {
            t.timed_out = 1;
        } else {
            t.failed = 1;
        }
    }
    let (_, requests, _) = common::client_totals(text);
    assert_eq!(requests, records, "{name}: the table counts another number");
    let rows: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("CSV rows "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name}: no CSV rows line"));
    assert_eq!(rows, records, "{name}: client CSV rows");
    t
}

#[test]
fn rdma_roles_across_the_link() {
    if !common::testbed_ready("two VMs") {
        return;
    }
    let model = common::model("resnet_tiny");
    let a = format!(
        r#"{TWO_VM_SH}
S={server}
RP={rproxy}
ZP={zproxy}
# perftest across the link: a serves, b connects. b retries until it gets its numbers, a
# serves again after every attempt that failed (ib_write_lat serves one connection and may
# hang after a half-made one: 45 s each), both within 240 s.
lat_end=$(($(date +%s) + 240))
while [ ! -e "$SYNC/lat-done" ] && [ "$(date +%s)" -lt $lat_end ]; do
  timeout 45 ib_write_lat -R -n 2000 -s 2 >/tmp/lat_server.log 2>&1 && break
  sleep 0.2
done
await lat-done 60 || fail=1
# The same pair over rxe's loopback inside a: the peer figure of this boot.
timeout 120 ib_write_lat -R -n 2000 -s 2 >/tmp/lo_server.log 2>&1 &
LS=$!
sleep 1
step lat_loopback 120 ib_write_lat -R -n 2000 -s 2 192.0.2.1
wait $LS || fail=1
$S --bind-address 192.0.2.1 -i 0 --engine-file {model} --poll-mode block --no-pin >/tmp/server.log 2>&1 &
SP=$!
wait_log /tmp/server.log "listening on" || fail=1
$RP --server-address 192.0.2.1 --target-port 20079 -p 20080 --bind-address 192.0.2.1 -c 2 --poll-mode block --request-timeout-ms 120000 >/tmp/rproxy.log 2>&1 &
RPP=$!
$ZP --server-address 192.0.2.1 --zmq-port 5600 -c 2 --poll-mode block -i 0 --request-timeout-ms 120000 >/tmp/zproxy.log 2>&1 &
ZPP=$!
wait_log /tmp/rproxy.log "listening on" || fail=1
wait_log /tmp/zproxy.log "listening on" || fail=1
signal up
await b-done 600 || fail=1
kill -TERM $ZPP; wait $ZPP || {{ fail=1; echo "FAILED: zmq_proxy exit"; }}
kill -TERM $RPP; wait $RPP || {{ fail=1; echo "FAILED: rdma_proxy exit"; }}
kill -TERM $SP; wait $SP || {{ fail=1; echo "FAILED: server exit"; }}
echo "=== zproxy ==="; cat /tmp/zproxy.log
echo "=== rproxy ==="; cat /tmp/rproxy.log
echo "=== server ==="; cat /tmp/server.log
echo "=== end ==="
exit $fail
"#,
        server = SERVER,
        rproxy = RPROXY,
        zproxy = ZPROXY,
        model = model.display(),
    );
    let b = format!(
        r#"{TWO_VM_SH}
C={rclient}
ZC={zclient}
trap 'signal b-done' EXIT
end=$(($(date +%s) + 240)); tries=0
until timeout 45 ib_write_lat -R -n 2000 -s 2 192.0.2.1 >/tmp/lat_link.log 2>&1; do
  tries=$((tries + 1)); [ "$(date +%s)" -ge $end ] && {{ fail=1; echo "FAILED: ib_write_lat across the link"; break; }}; sleep 2
done
echo "=== lat_link ==="; echo "tries $tries"; cat /tmp/lat_link.log
signal lat-done
await up 300 || {{ echo "FAILED: the servers never came up"; exit 1; }}
tx0=$(cat /sys/class/net/eth0/statistics/tx_bytes)
step echo_fast 300 $C --host 192.0.2.1 -t echo --payload-size 64 -r 500 --fast-path on --client-id 1 --timeout-ms 20000
step echo_imm 300 $C --host 192.0.2.1 -t echo --payload-size 64 -r 500 --fast-path off --client-id 2 --timeout-ms 20000
step echo_big_fast 300 $C --host 192.0.2.1 -t echo -r 50 --fast-path on --client-id 3 --timeout-ms 20000
step echo_big_imm 300 $C --host 192.0.2.1 -t echo -r 50 --fast-path off --client-id 4 --timeout-ms 20000
step infer_fast 300 $C --host 192.0.2.1 -t jpeg -r 2 --fast-path on --client-id 5 --timeout-ms 120000
step infer_imm 300 $C --host 192.0.2.1 -t jpeg -r 2 --fast-path off --client-id 6 --timeout-ms 120000
step proxy_echo_fast 300 $C --host 192.0.2.1 -p 20080 -t echo --payload-size 64 -r 200 --fast-path on --client-id 7 --timeout-ms 20000
step proxy_echo_imm 300 $C --host 192.0.2.1 -p 20080 -t echo -r 20 --fast-path off --client-id 8 --timeout-ms 20000
step proxy_infer 300 $C --host 192.0.2.1 -p 20080 -t jpeg -r 1 --client-id 9 --timeout-ms 120000
step zmq_echo 300 $ZC --host 192.0.2.1 --port 5600 -t echo -r 50 --client-id 10 --timeout-ms 20000
# killed NAME CLIENT-ARGS...: a -d echo stream SIGKILLed once request 20 is answered (the
# next ones in flight), then a fresh client of the same kind must be served in full.
killed() {{ name=$1; shift; $C "$@" -r 1000000 -d >/tmp/$name.log 2>&1 & K=$!; end=$(($(date +%s) + 120)); until grep -q "request 20: status" /tmp/$name.log; do kill -0 $K 2>/dev/null || break; [ "$(date +%s)" -ge $end ] && break; sleep 0.2; done; kill -KILL $K; wait $K; rc=$?; echo "=== $name ==="; echo "exit status $rc"; cat /tmp/$name.log; }}
killed kill_fast --host 192.0.2.1 -t echo --payload-size 64 --fast-path on --client-id 11 --timeout-ms 20000
step after_kill_fast 300 $C --host 192.0.2.1 -t echo --payload-size 64 -r 100 --fast-path on --client-id 12 --timeout-ms 20000
killed kill_event --host 192.0.2.1 -t echo --payload-size 64 --poll-mode event --client-id 13 --timeout-ms 20000
step after_kill_event 300 $C --host 192.0.2.1 -t echo --payload-size 64 -r 100 --poll-mode event --client-id 14 --timeout-ms 20000
killed kill_proxy --host 192.0.2.1 -p 20080 -t echo --payload-size 1024 --client-id 15 --timeout-ms 20000
step after_kill_proxy 300 $C --host 192.0.2.1 -p 20080 -t echo --payload-size 1024 -r 100 --client-id 16 --timeout-ms 20000
echo "=== link ==="
echo "eth0 tx_bytes during the clients $(($(cat /sys/class/net/eth0/statistics/tx_bytes) - tx0))"
echo "=== end ==="
exit $fail
"#,
        rclient = RCLIENT,
        zclient = ZCLIENT,
    );
    let run = common::run_in_2vm("two_vm_roles", &a, &b, 900);
    assert_eq!(run.status_a, Some(0), "guest a's script failed");
    assert_eq!(run.status_b, Some(0), "guest b's script failed");
    assert_eq!(run.status, Some(0));
    for text in [&run.a, &run.b] {
        assert!(!text.contains("panicked"), "a process panicked");
    }
    let link = perftest_lat(section(&run.b, "lat_link"));
    let lo = perftest_lat(section(&run.a, "lat_loopback"));
    eprintln!(
        "ib_write_lat -s 2 across the link: typical {:.2} us, 99% {:.2} us; \
         rxe loopback inside guest a: typical {:.2} us, 99% {:.2} us; two-VM run {:.1} s",
        link.0, link.1, lo.0, lo.1, run.wall_s
    );
    for (name, head, requests, transport) in [
        (
            "echo_fast",
            "rdma_client 1 -> 192.0.2.1:20079 task echo (64 B payload)",
            500,
            Some("fast path"),
        ),
        (
            "echo_imm",
            "rdma_client 2 -> 192.0.2.1:20079 task echo (64 B payload)",
            500,
            Some("WRITE_WITH_IMM"),
        ),
        (
            "echo_big_fast",
            "rdma_client 3 -> 192.0.2.1:20079 task echo (83774 B payload)",
            50,
            None,
        ),
        (
            "echo_big_imm",
            "rdma_client 4 -> 192.0.2.1:20079 task echo (83774 B payload)",
            50,
            Some("WRITE_WITH_IMM"),
        ),
        (
            "infer_fast",
            "rdma_client 5 -> 192.0.2.1:20079 task jpeg",
            2,
            None,
        ),
        (
            "infer_imm",
            "rdma_client 6 -> 192.0.2.1:20079 task jpeg",
            2,
            Some("WRITE_WITH_IMM"),
        ),
        (
            "proxy_echo_fast",
            "rdma_client 7 -> 192.0.2.1:20080 task echo (64 B payload)",
            200,
            None,
        ),
        (
            "proxy_echo_imm",
            "rdma_client 8 -> 192.0.2.1:20080 task echo (83774 B payload)",
            20,
            Some("WRITE_WITH_IMM"),
        ),
        (
            "proxy_infer",
            "rdma_client 9 -> 192.0.2.1:20080 task jpeg",
            1,
            None,
        ),
        (
            "zmq_echo",
            "zmq_client 10 -> 192.0.2.1:5600 task echo",
            50,
            None,
        ),
        (
            "after_kill_fast",
            "rdma_client 12 -> 192.0.2.1:20079 task echo (64 B payload)",
            100,
            Some("fast path"),
        ),
        (
            "after_kill_event",
            "rdma_client 14 -> 192.0.2.1:20079 task echo (64 B payload)",
            100,
            Some("WRITE_WITH_IMM"),
        ),
        (
            "after_kill_proxy",
            "rdma_client 16 -> 192.0.2.1:20080 task echo (1024 B payload)",
            100,
            None,
        ),
    ] {
        let text = section(&run.b, name);
        assert_eq!(exit_status(text), 0, "{name}:\n{text}");
        assert!(text.contains(head), "{name}: missing {head:?}:\n{text}");
        assert!(
            text.contains(&format!(": {requests} requests, 0 errors")),
            "{name}: not every request answered:\n{text}"
        );
        if let Some(t) = transport {
            assert!(
                text.lines()
                    .any(|l| l.contains(" connected to 192.0.2.1:") && l.contains(t)),
                "{name}: not connected with {t}:\n{text}"
            );
        }
    }
    // Clients SIGKILLed mid-stream across the link (fast path, event mode, through the
    // zero-copy rdma_proxy): killed after request 20 was answered; the fresh clients above
    // were served in full, and the server's counters below still balance.
    for name in ["kill_fast", "kill_event", "kill_proxy"] {
        let text = section(&run.b, name);
        assert_eq!(
            exit_status(text),
            137,
            "{name} not killed by SIGKILL:\n{text}"
        );
        assert!(
            text.contains("request 20: status"),
            "{name} killed before 20 answers:\n{text}"
        );
    }
    let want = top1(section(&run.b, "infer_imm"));
    for name in ["infer_fast", "proxy_infer"] {
        assert_eq!(top1(section(&run.b, name)), want, "{name}: top-1 differs");
    }
    // The RoCE traffic went out of b's NIC: at least the payloads b sent (the one-VM testbed
    // sends nothing on a NIC at all).
    let link_text = section(&run.b, "link");
    let tx: u64 = link_text
        .lines()
        .find_map(|l| l.strip_prefix("eth0 tx_bytes during the clients "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tx_bytes line:\n{link_text}"));
    let payloads = 500 * 64 * 2 + 50 * 83774 * 2 + 200 * 64 + 20 * 83774 + 50 * 83774;
    assert!(
        tx > payloads,
        "b sent {tx} B on eth0, its payloads alone are {payloads} B"
    );
    // Every request the server received it answered (none refused, none lost).
    let server = section(&run.a, "server");
    let line = stop_line_in(server, "rdma_server");
    assert_eq!(
        common::counter(line, "received"),
        common::counter(line, "answered"),
        "{line}"
    );
    for (name, role) in [("rproxy", "rdma_proxy"), ("zproxy", "zmq_proxy")] {
        let text = section(&run.a, name);
        assert!(text.contains(&format!("{role} stopped")), "{text}");
    }
}

#[test]
fn faults_on_the_link() {
    if !common::testbed_ready("two VMs") {
        return;
    }
    let model = common::model("resnet_tiny");
    let a = format!(
        r#"{TWO_VM_SH}
S={server}
# Loss and delay on a's side of the link too (netem acts on a NIC's egress).
tc qdisc add dev eth0 root netem delay 1ms loss 1% || {{ fail=1; echo "FAILED: tc netem on a"; }}
# The default --peer-timeout-ms on purpose: it must outlast RC's retransmissions of a reply
# (or its ACK) lost on this link (rdma_cm's RoCE ack timeout, ~1 s per retry; several in a
# row for an 83 KB reply); 1000 ms did not, and 5000 is the likeliest cause of one CI failure.
$S --bind-address 192.0.2.1 -i 0 --engine-file {model} --poll-mode block --no-pin >/tmp/server.log 2>&1 &
SP=$!
wait_log /tmp/server.log "listening on" || fail=1
signal up
await b-done 800 || fail=1
echo "=== netem_a ==="; tc -s qdisc show dev eth0
# Whatever the cuts did to the link, the server still serves: a client inside a (loopback).
tc qdisc del dev eth0 root
step loopback_after 120 {client} --host 192.0.2.1 -t echo --payload-size 64 -r 20 --client-id 20 --timeout-ms 20000
kill -TERM $SP; wait $SP || {{ fail=1; echo "FAILED: server exit"; }}
echo "=== server ==="; cat /tmp/server.log
echo "=== end ==="
exit $fail
"#,
        server = SERVER,
        client = RCLIENT,
        model = model.display(),
    );
    let b = format!(
        r#"{TWO_VM_SH}
C={rclient}
trap 'signal b-done' EXIT
lossy() {{ tc qdisc change dev eth0 root netem delay 1ms loss 1%; }}
# client NAME ID DEADLINE ARGS...: an rdma_client with -d and its CSV, in the background;
# --reconnect-ms 0: a lost connection ends the run (no request sent twice).
client() {{ name=$1; id=$2; limit=$3; shift 3; timeout -k 5 $limit $C --host 192.0.2.1 --client-id $id --reconnect-ms 0 -d -s -f /tmp/$name "$@" >/tmp/$name.log 2>&1 & K=$!; }}
# answers NAME N: until the client's request N was answered or it ended (quiet, 120 s).
answers() {{ end=$(($(date +%s) + 120)); until grep -q "request $2: status" /tmp/$1.log; do kill -0 $K 2>/dev/null || {{ echo "NOTE: $1 ended before request $2"; return 1; }}; [ "$(date +%s)" -ge $end ] && {{ echo "NOTE: $1 no request $2 in 120 s"; return 1; }}; sleep 0.5; done; }}
# finish NAME ID: wait for it, print its section.
finish() {{ wait $K; rc=$?; echo "=== $1 ==="; echo "exit status $rc"; csv=/tmp/$1/client_$2.csv; if [ -f $csv ]; then echo "CSV rows $(($(wc -l < $csv) - 1))"; else echo "CSV rows 0"; fi; cat /tmp/$1.log; }}
await up 300 || {{ echo "FAILED: the server never came up"; exit 1; }}
tc qdisc add dev eth0 root netem delay 1ms loss 1% || {{ fail=1; echo "FAILED: tc netem on b"; }}
# 1. A lossy, slow link: RC's retransmissions must carry every request through.
for spec in "lossy_fast 1 --fast-path on -t echo --payload-size 64 -r 200" "lossy_imm 2 --fast-path off -t echo --payload-size 64 -r 200" "lossy_big 3 -t echo -r 10" "lossy_infer 4 -t jpeg -r 2"; do
  set -- $spec; name=$1; id=$2; shift 2
  client $name $id 300 --timeout-ms 60000 "$@"; finish $name $id
done
# 2. The link cut under a running echo stream (3 s reply timeout), then restored.
client cut_short 5 300 -t echo --payload-size 64 -r 400 --timeout-ms 3000
answers cut_short 50
tc qdisc change dev eth0 root netem loss 100%; sleep 1; lossy
finish cut_short 5
client cut_long 6 120 -t echo --payload-size 64 -r 1000000 --timeout-ms 3000
answers cut_long 50
tc qdisc change dev eth0 root netem loss 100%; sleep 8; lossy
finish cut_long 6
client after_long 7 300 -t echo --payload-size 64 -r 50 --timeout-ms 20000; finish after_long 7
client cut_down 8 120 -t echo --payload-size 64 -r 1000000 --timeout-ms 3000
answers cut_down 50
ip link set eth0 down; sleep 5; ip link set eth0 up
finish cut_down 8
# Back over the link after eth0 came up again? Up to 3 tries (each ends by itself).
for try in 1 2 3; do
  sleep 2
  client after_down_$try 9 120 -t echo --payload-size 64 -r 50 --timeout-ms 10000; finish after_down_$try 9
  grep -q ": 50 requests, 0 errors" /tmp/after_down_$try.log && break
done
echo "=== netem_b ==="; tc -s qdisc show dev eth0
echo "=== end ==="
exit $fail
"#,
        rclient = RCLIENT,
    );
    let run = common::run_in_2vm("two_vm_faults", &a, &b, 900);
    assert_eq!(run.status_a, Some(0), "guest a's script failed");
    assert_eq!(run.status_b, Some(0), "guest b's script failed");
    for text in [&run.a, &run.b] {
        assert!(!text.contains("panicked"), "a process panicked");
    }
    let mut total = Tally::default();
    let mut stopped = 0;
    let mut names: Vec<String> = [
        "lossy_fast",
        "lossy_imm",
        "lossy_big",
        "lossy_infer",
        "cut_short",
        "cut_long",
        "after_long",
        "cut_down",
    ]
    .map(String::from)
    .to_vec();
    let after_down: Vec<String> = (1..=3)
        .map(|i| format!("after_down_{i}"))
        .filter(|n| run.b.contains(&format!("=== {n} ===")))
        .collect();
    assert!(!after_down.is_empty(), "no client ran after eth0 came up");
    names.extend(after_down.iter().cloned());
    for name in &names {
        let text = section(&run.b, name);
        let rc = exit_status(text);
        // `timeout` gives 124 (or 137 after its -k): the client hung past its deadline.
        assert!(
            rc != 124 && rc != 137,
            "{name}: hung, killed by its deadline:\n{text}"
        );
        let t = tally(name, text);
        let connect_failed = text.contains("Error: connecting to");
        eprintln!(
            "{name}: exit {rc}, sent {} = answered {} + error replies {} + timed out {} + failed {}{}",
            t.sent(),
            t.answered,
            t.error_replies,
            t.timed_out,
            t.failed,
            if connect_failed { " (could not connect)" } else { "" }
        );
        assert_eq!(
            rc == 0,
            t.timed_out + t.failed == 0 && !connect_failed,
            "{name}: exit {rc} vs {t:?}"
        );
        if !name.starts_with("cut_") && !name.starts_with("after_down") {
            // No cut: every request answered, none failed.
            assert_eq!(rc, 0, "{name}:\n{text}");
            assert_eq!(t.error_replies, 0, "{name}:\n{text}");
        }
        if name == "cut_long" || name == "cut_down" {
            // 8 s / 5 s without a link and a 3 s timeout: the run must have ended by itself.
            assert_eq!(
                t.timed_out + t.failed,
                1,
                "{name}: went on through the cut:\n{text}"
            );
        }
        stopped += t.timed_out + t.failed;
        total.answered += t.answered;
        total.error_replies += t.error_replies;
        total.timed_out += t.timed_out;
        total.failed += t.failed;
    }
    let last = after_down.last().map(|n| section(&run.b, n)).unwrap_or("");
    if exit_status(last) != 0 {
        // Not a failure of the invariant (every client ended with a verdict), but say it.
        eprintln!(
            "NOTE two VMs: after b's eth0 went down and up, {} tries found no service over the link:\n{last}",
            after_down.len()
        );
    }
    // The server still serves (a client inside guest a, over rxe's loopback).
    let lo = section(&run.a, "loopback_after");
    assert!(lo.contains(": 20 requests, 0 errors"), "{lo}");
    // None lost on the server's side either: each request it received has an outcome; a
    // reply it could not deliver is one of the stopped clients' (at most one each); and it
    // received each request a client got an answer to, plus at most the one request that
    // stopped each stopped client.
    let line = stop_line_in(section(&run.a, "server"), "rdma_server");
    let n = |k: &str| common::counter(line, k);
    let (received, answered) = (n("received"), n("answered"));
    eprintln!("server: {line}; clients: {total:?}, {stopped} stopped");
    assert_eq!(
        received,
        answered + n("rejected") + n("overloaded"),
        "the server lost a request: {line}"
    );
    assert!(
        n("undeliverable") + n("dropped") <= stopped,
        "more replies undelivered than clients stopped: {line}"
    );
    let loopback = 20;
    let replied = total.answered + total.error_replies + loopback;
    assert!(
        (replied..=replied + stopped).contains(&received),
        "server received {received}, clients got {replied} replies and {stopped} stopped: {line}"
    );
    assert!(
        (total.answered + loopback..=total.answered + loopback + stopped).contains(&answered),
        "server answered {answered}, clients got {} answers: {line}",
        total.answered + loopback
    );
}
