//! `--max-image-pixels` on rdma_server, over real RDMA (Soft-RoCE) in the qemu testbed: an
//! image above the default limit (7000x4000 = 28 MP) gets `PayloadTooLarge` from its header
//! while a client sending ordinary images at the same time is answered, and the server goes
//! on. Skips loudly without the testbed (HACSERVE_TESTBED_REQUIRED=1 makes that a failure).

mod common;

const SERVER: &str = env!("CARGO_BIN_EXE_rdma_server");
const CLIENT: &str = env!("CARGO_BIN_EXE_rdma_client");

#[test]
fn rdma_server_refuses_an_image_over_the_limit_and_serves_the_others() {
    if !common::testbed_ready("rdma image limits in VM") {
        return;
    }
    let model = common::model("resnet_tiny");
    let dir = common::temp_dir("rdma-image-limits");
    let big = dir.join("7000x4000.jpg");
    std::fs::write(&big, common::generated_jpeg(7000, 4000, false)).unwrap();
    let script = format!(
        r#"set -u
S={server}
C={client}
export RUST_BACKTRACE=0
fail=0
$S --bind-address 192.0.2.1 -i 0 --engine-file {model} --poll-mode block --no-pin --workers 2 >/tmp/server.log 2>&1 &
SP=$!
for i in $(seq 1 150); do grep -q "listening on" /tmp/server.log && break; sleep 0.2; done
$C --host 192.0.2.1 -t jpeg -r 4 -i {big} --client-id 1 --timeout-ms 60000 >/tmp/big.log 2>&1 &
BP=$!
$C --host 192.0.2.1 -t jpeg -r 6 --client-id 2 --timeout-ms 120000 || fail=1
wait $BP
echo "BIG CLIENT:"; cat /tmp/big.log
kill -TERM $SP
wait $SP || fail=1
echo "SERVER LOG:"
cat /tmp/server.log
exit $fail
"#,
        server = SERVER,
        client = CLIENT,
        model = model.display(),
        big = big.display(),
    );
    let run = common::run_script_in_vm("rdma_image_limits_in_vm", &script, 500);
    let stdout = &run.stdout;
    assert_eq!(run.status, Some(0), "script failed");
    for want in [
        "images up to 24000000 px",
        "rdma_client 2 -> 192.0.2.1:20079 task jpeg",
        "model resnet50: 6 requests, 0 errors",
        "server error 6: image is 7000x4000 = 28000000 pixels, above this server's limit of 24000000",
        "PayloadTooLarge: image is 7000x4000",
        "rdma_server stopped: received 10 answered 6 rejected 4",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in the VM output");
    }
    assert!(!stdout.contains("panicked"), "a process panicked");
}
