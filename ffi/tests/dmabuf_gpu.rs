//! GPUDirect RDMA's first half on a real GPU: device memory exported as a dma-buf fd, the
//! handle `ibv_reg_dmabuf_mr` takes. (The second half needs an RDMA NIC beside the GPU; no
//! machine here has one: docs/gpudirect.md says how to run that part.) Skips loudly without
//! a CUDA driver.

use std::io::{Seek, SeekFrom};

use hacserve_ffi::gpu::cuda;

#[test]
fn device_memory_exports_as_a_dmabuf_of_its_size() {
    if !cuda::driver_present() {
        eprintln!("SKIPPED dma-buf export test: no CUDA driver (libcuda.so.1) on this machine");
        return;
    }
    let ctx = cuda::driver(0).expect("CUDA context on GPU 0");
    let stream = ctx.default_stream();
    let len = 4 << 20;
    let buf = stream.alloc_zeros::<u8>(len).unwrap();
    let fd = match cuda::export_dmabuf(&stream, &buf) {
        Ok(fd) => fd,
        Err(cuda::CudaError::Unsupported(why)) => {
            eprintln!("SKIPPED dma-buf export test: {why}");
            return;
        }
        Err(e) => panic!("dma-buf export failed: {e}"),
    };
    // A dma-buf reports its size through lseek(SEEK_END).
    let mut file = std::fs::File::from(fd);
    let size = file.seek(SeekFrom::End(0)).unwrap();
    println!(
        "dma-buf export of a {len}-byte cuMemAlloc buffer on {:?}: fd size {size}",
        ctx.name()
    );
    assert_eq!(size as usize, len);
}

/// A request copy ring (as `rdma_server -a 0` makes one per connection with a GPU backend)
/// registered with CUDA: cuMemHostRegister succeeds, an upload from a slot carries
/// the slot's bytes, the counts say what is registered, and dropping the ring unregisters it.
#[test]
fn host_copy_ring_registers_with_cuda_and_uploads_in_place() {
    use hacserve_ffi::gpu::host_register;
    use hacserve_ffi::rdma::{HostBuf, SlotRing};
    if !cuda::driver_present() {
        eprintln!("SKIPPED host registration test: no CUDA driver (libcuda.so.1) on this machine");
        return;
    }
    let ctx = cuda::driver(0).expect("CUDA context on GPU 0");
    let stream = ctx.default_stream();
    let (slot, depth) = (602_176usize, 4u32);
    let before = host_register::counts();
    let mut mem = HostBuf::new(slot * depth as usize).unwrap();
    mem.register_with_cuda(&ctx)
        .expect("cuMemHostRegister of the copy ring");
    assert!(mem.cuda_registered());
    mem.register_with_cuda(&ctx)
        .expect("registering twice is a no-op");
    let ring = SlotRing::new(mem, slot, depth).unwrap();
    let now = host_register::counts();
    assert_eq!(now.registered, before.registered + 1);
    assert_eq!(now.live, before.live + 1);
    assert!(now.bytes >= before.bytes + (slot * depth as usize) as u64);
    let mut token = ring.claim(2).unwrap();
    for (i, b) in token.bytes_mut().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let mut dev = stream.alloc_zeros::<u8>(slot).unwrap();
    stream.memcpy_htod(token.bytes(), &mut dev).unwrap();
    let back = stream.clone_dtoh(&dev).unwrap();
    assert_eq!(back, token.bytes(), "upload from the registered slot");
    drop(token);
    drop(ring);
    assert_eq!(host_register::counts().live, before.live);
    println!(
        "copy ring of {} B registered with CUDA, slot uploaded in place, unregistered on drop",
        slot * depth as usize
    );
}
