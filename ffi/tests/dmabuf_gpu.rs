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
