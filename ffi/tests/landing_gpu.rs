//! `Handles::download_async` into a `HostLanding` on a real GPU: exactly the values asked
//! for are copied (from a device buffer smaller than the landing, which cudarc's own
//! pinned download would read past), and `wait` returns only once they have landed (a
//! large download queued behind a large upload, read back at once). Skips loudly without
//! a GPU.

use hacserve_ffi::gpu::ops::GpuDevice;

#[test]
fn an_async_download_lands_exactly_what_was_asked_and_wait_waits_for_it() {
    let device = match GpuDevice::open(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED download landing test: no usable GPU 0 ({e})");
            return;
        }
    };
    let handles = device.handles().expect("stream and handles on GPU 0");

    // A small source into a landing ten times its size: only the source's values move.
    let small: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let mut small_dev = handles.zeros::<f32>(small.len()).unwrap();
    handles.upload(small.as_slice(), &mut small_dev).unwrap();
    let mut landing = handles.landing(10 * small.len()).unwrap();
    handles
        .download_async(&small_dev, small.len(), &mut landing)
        .expect("a download of the source's length into a larger landing");
    assert_eq!(landing.wait(small.len()).unwrap(), small.as_slice());
    assert!(handles
        .download_async(&small_dev, small.len() + 1, &mut landing)
        .is_err());

    // 256 MiB up then down on one stream, the download read right after it is queued:
    // without the landing's own event the read would see the zeros it was made with.
    let n = 64 << 20;
    let big: Vec<f32> = (0..n).map(|i| (i % 9973) as f32 + 0.5).collect();
    let mut big_dev = handles.zeros::<f32>(n).unwrap();
    handles.synchronize().unwrap();
    let mut big_landing = handles.landing(n).unwrap();
    let queued = std::time::Instant::now();
    handles.upload(big.as_slice(), &mut big_dev).unwrap();
    handles
        .download_async(&big_dev, n, &mut big_landing)
        .unwrap();
    let after_queue = queued.elapsed();
    let landed = big_landing.wait(n).unwrap();
    println!(
        "256 MiB up + down queued in {after_queue:?}, landed after {:?}",
        queued.elapsed()
    );
    assert!(
        landed == big.as_slice(),
        "the landing was read before the download landed"
    );
}
