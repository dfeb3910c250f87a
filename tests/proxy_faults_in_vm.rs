//! The proxies survive their backend: in ONE VM boot (Soft-RoCE), zmq_proxy and rdma_proxy
//! forward echo traffic from client loops to an rdma_server that is first SIGKILLed and
//! restarted, then SIGSTOPped and resumed. Every request gets one answer (the backend's, or
//! the proxy's own `Unavailable` while the backend is gone and `Timeout` for what the stopped
//! backend held), no client ever waits past its own timeout, both proxies keep running and
//! reconnect, and traffic is answered by the backend again at the end. Last, a direct
//! rdma_client whose server is SIGKILLed and restarted mid-run connects again and completes
//! its run without an error.
//!
//! Without qemu or the testbed kernel it prints `SKIPPED proxy faults in VM: <reason>` to
//! stderr and passes (HACSERVE_TESTBED_REQUIRED=1 turns the skip into a failure).

mod common;

use common::{client_totals, proxy_share_sum, section, stop_line_in};

const SERVER: &str = env!("CARGO_BIN_EXE_rdma_server");
const RCLIENT: &str = env!("CARGO_BIN_EXE_rdma_client");
const ZCLIENT: &str = env!("CARGO_BIN_EXE_zmq_client");
const ZPROXY: &str = env!("CARGO_BIN_EXE_zmq_proxy");
const RPROXY: &str = env!("CARGO_BIN_EXE_rdma_proxy");

#[test]
fn proxies_survive_a_killed_and_a_stopped_backend_in_the_vm() {
    if !common::testbed_ready("proxy faults in VM") {
        return;
    }
    let model = common::model("resnet_tiny");
    let script = format!(
        r#"set -u
S={server}
RC={rclient}
ZC={zclient}
ZP={zproxy}
RP={rproxy}
export RUST_BACKTRACE=0
fail=0
wait_for() {{ for i in $(seq 1 150); do grep -q "listening on" "$1" && return 0; sleep 0.2; done; echo "NOT READY: $1"; cat "$1"; return 1; }}
server() {{ $S --bind-address 192.0.2.1 -i 0 --engine-file {model} --poll-mode block --no-pin >/tmp/$1.log 2>&1 & SP=$!; }}
# Client runs of 200 echoes one after another until /tmp/stop; a run that ends early (no
# answer within its 8 s timeout) prints "run stopped" and is a hang.
loop_of() {{ name=$1; shift; while [ ! -f /tmp/stop ]; do "$@" >/tmp/$name.run 2>&1 || echo "RUN FAILED" >>/tmp/$name.log; grep -h " requests, \|run stopped" /tmp/$name.run >>/tmp/$name.log; done; }}
server server1
wait_for /tmp/server1.log || fail=1
$ZP --server-address 192.0.2.1 --zmq-port 5600 -c 2 --poll-mode block --forwarder thread -i 0 --request-timeout-ms 1500 >/tmp/zproxy.log 2>&1 &
ZPP=$!
$RP --server-address 192.0.2.1 --target-port 20079 -p 20080 --bind-address 192.0.2.1 -c 2 --poll-mode block --request-timeout-ms 1500 >/tmp/rproxy.log 2>&1 &
RPP=$!
wait_for /tmp/zproxy.log || fail=1
wait_for /tmp/rproxy.log || fail=1
loop_of zloop $ZC --host 192.0.2.1 --port 5600 -t echo -r 200 --client-id 10 --timeout-ms 8000 &
ZL=$!
loop_of rloop $RC --host 192.0.2.1 -p 20080 -t echo -r 200 --client-id 20 --timeout-ms 8000 &
RL=$!
sleep 6
echo "fault: SIGKILL rdma_server"; kill -KILL $SP; wait $SP 2>/dev/null
sleep 3
echo "fault: rdma_server restarted"; server server2
wait_for /tmp/server2.log || fail=1
sleep 8
echo "fault: SIGSTOP rdma_server"; kill -STOP $SP
sleep 5
echo "fault: SIGCONT rdma_server"; kill -CONT $SP
sleep 8
touch /tmp/stop
wait $ZL; wait $RL
# After the faults: both proxies answer everything from the backend again.
step() {{ name=$1; shift; "$@" >/tmp/$name.log 2>&1 || {{ fail=1; echo "FAILED: $name"; }}; echo "=== $name ==="; grep " requests, " /tmp/$name.log; }}
step zmq_after $ZC --host 192.0.2.1 --port 5600 -t echo -r 50 --client-id 11 --timeout-ms 8000
step rdma_after $RC --host 192.0.2.1 -p 20080 -t echo -r 50 --client-id 21 --timeout-ms 8000
# A direct rdma_client across a server restart: it connects again and sends its request again.
$RC --host 192.0.2.1 -t jpeg -r 15 --client-id 30 --timeout-ms 20000 --reconnect-ms 30000 >/tmp/direct.log 2>&1 &
DC=$!
for i in $(seq 1 300); do grep -q "connected to" /tmp/direct.log && break; sleep 0.1; done
sleep 2
echo "fault: SIGKILL rdma_server under a direct client"; kill -KILL $SP; wait $SP 2>/dev/null
sleep 1
server server3
wait_for /tmp/server3.log || fail=1
wait $DC || {{ fail=1; echo "FAILED: direct client"; }}
echo "=== direct ==="; grep -v " WARN " /tmp/direct.log; echo "resent after reconnecting: $(grep -c "reconnected, sending it again" /tmp/direct.log)"
kill -0 $ZPP || {{ fail=1; echo "FAILED: zmq_proxy died"; }}
kill -0 $RPP || {{ fail=1; echo "FAILED: rdma_proxy died"; }}
kill -TERM $ZPP; wait $ZPP || {{ fail=1; echo "FAILED: zmq_proxy exit"; }}
kill -TERM $RPP; wait $RPP || {{ fail=1; echo "FAILED: rdma_proxy exit"; }}
kill -TERM $SP; wait $SP || {{ fail=1; echo "FAILED: server exit"; }}
echo "=== zloop ==="; cat /tmp/zloop.log
echo "=== rloop ==="; cat /tmp/rloop.log
echo "=== zproxy ==="; grep -m1 "listening on" /tmp/zproxy.log; grep -v "^\[" /tmp/zproxy.log | grep -v " WARN " | tail -n 40
echo "=== rproxy ==="; grep -m1 "listening on" /tmp/rproxy.log; grep -v "^\[" /tmp/rproxy.log | grep -v " WARN " | tail -n 40
echo "=== server ==="; grep -v " WARN " /tmp/server3.log | tail -n 20
echo "=== end ==="
exit $fail
"#,
        server = SERVER,
        rclient = RCLIENT,
        zclient = ZCLIENT,
        zproxy = ZPROXY,
        rproxy = RPROXY,
        model = model.display(),
    );
    let run = common::run_script_in_vm("proxy_faults_in_vm", &script, 500);
    let stdout = &run.stdout;
    let zproxy = section(stdout, "zproxy");
    let rproxy = section(stdout, "rproxy");
    println!("zmq_proxy:\n{zproxy}\nrdma_proxy:\n{rproxy}");
    // The faults with each placement of the forwarder (block mode: auto is inline).
    assert!(zproxy.contains("forwarder on its own thread"), "{zproxy}");
    assert!(rproxy.contains("forwarder inline"), "{rproxy}");
    assert_eq!(run.status, Some(0), "script failed:\n{stdout}");
    assert!(!stdout.contains("panicked"), "a process panicked");
    let direct = section(stdout, "direct");
    println!("direct rdma_client across a restart:\n{direct}");
    assert!(direct.contains("15 requests, 0 errors"), "{direct}");
    assert!(direct.contains("resent after reconnecting: 1"), "{direct}");
    for (name, proxy, role, after) in [
        ("zloop", zproxy, "zmq_proxy", "zmq_after"),
        ("rloop", rproxy, "rdma_proxy", "rdma_after"),
    ] {
        let all = section(stdout, name);
        assert!(
            !all.contains("RUN FAILED") && !all.contains("run stopped"),
            "{name}: a client waited past its timeout:\n{all}"
        );
        let (runs, requests, errors) = client_totals(all);
        let (_, after_requests, after_errors) = client_totals(section(stdout, after));
        println!("{name}: {runs} runs, {requests} requests, {errors} errors during the faults; after them: {after_requests} requests, {after_errors} errors");
        assert!(errors > 0, "{name}: the faults cost no request? {all}");
        assert_eq!(
            (after_requests, after_errors),
            (50, 0),
            "{name}: traffic is not answered again after the faults"
        );
        // Each proxy answered the errors itself, and every one it answered reached a client.
        assert!(proxy.contains("stopped"), "{proxy}");
        assert!(
            proxy_share_sum(stop_line_in(proxy, role), "reconnects") >= 2,
            "{name}: reconnected: {proxy}"
        );
        assert!(
            proxy_share_sum(stop_line_in(proxy, role), "timed") >= 1,
            "{name}: the stopped backend's requests timed out: {proxy}"
        );
    }
}
