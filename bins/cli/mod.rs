//! Option groups and shared main bodies for the binaries.
//!
//! argh has no `#[argh(flatten)]`, so [`cli_args!`](crate::cli_args) writes each group's
//! fields into the role's own `Args` struct (one flat argh struct, so `--help` lists every
//! option as before) and adds one accessor per group that copies the values into the group's
//! struct here (`args.server()` -> [`ServerArgs`]). Each group's fields, doc comments and
//! defaults are written once, in the macro's `@group` arms; the same arm also defines the
//! group struct below, so the two cannot drift. Types are bracketed in those arms
//! (`debug: [bool]`) so that they reach argh as plain tokens: argh tells a switch by its type's
//! spelling, which a `$ty:ty` fragment would hide.

pub mod check;
pub mod client;
pub mod load;
pub mod progress;
pub mod proxy;
pub mod results;
pub mod server;
pub mod version;

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use hacserve_runtime::protocol::Workload;
use hacserve_runtime::transport::rdma::{check_geometry, Addressing, RdmaServerConfig};
use hacserve_runtime::{logging, signal};

/// Emits `#[derive(FromArgs)] pub struct $name` with the role's own fields followed by the
/// fields of every group named in brackets, and `impl $name { fn <group>(&self) -> Group }`.
///
/// Groups: `server` ([`ServerArgs`]: serving and backend options), `ring_limits`
/// ([`RingLimits`]: the largest ring a listening RDMA side grants), `client`
/// ([`ClientArgs`]), `proxy` ([`ProxyArgs`]), `metrics` ([`MetricsArgs`]: the resources
/// sampler and `--metrics-port`), `check` ([`CheckArgs`]: `--check`, see [`check`]).
#[macro_export]
macro_rules! cli_args {
    // Entry: a role's struct.
    (
        $(#[$meta:meta])*
        struct $name:ident [$($group:ident),* $(,)?] { $($own:tt)* }
    ) => {
        $crate::cli_args!(@next [$(#[$meta])*] $name { $($own)* } [] $($group)*);
    };
    // Fetch the next group's fields (its `@group` arm calls back into `@collect`).
    (@next $meta:tt $name:ident $own:tt [$($done:tt)*] $group:ident $($rest:ident)*) => {
        $crate::cli_args!(@group $group [@collect $meta $name $own [$($rest)*] [$($done)*]]);
    };
    (@collect $meta:tt $name:ident $own:tt [$($rest:ident)*] [$($done:tt)*]
        $acc:ident $gstruct:ident { $($fields:tt)* }) => {
        $crate::cli_args!(@next $meta $name $own [$($done)* $acc $gstruct { $($fields)* }] $($rest)*);
    };
    // Every group fetched: the argh struct and the group accessors.
    (@next [$($meta:tt)*] $name:ident { $($own:tt)* } [$(
        $acc:ident $gstruct:ident { $(
            $(#[doc = $doc:literal])*
            #[argh($($argh:tt)*)]
            $field:ident : [$($ty:tt)*],
        )* }
    )*]) => {
        #[derive(::argh::FromArgs)]
        $($meta)*
        pub struct $name {
            $($own)*
            $($(
                $(#[doc = $doc])*
                #[argh($($argh)*)]
                pub $field: $($ty)*,
            )*)*
        }

        impl $name {
            $(
                /// This group's values.
                pub fn $acc(&self) -> $crate::cli::$gstruct {
                    $crate::cli::$gstruct { $($field: ::std::clone::Clone::clone(&self.$field),)* }
                }
            )*
        }
    };
    // The group structs of this module.
    (@define $acc:ident $gstruct:ident { $(
        $(#[doc = $doc:literal])*
        #[argh($($argh:tt)*)]
        $field:ident : [$($ty:tt)*],
    )* }) => {
        #[doc = concat!("The `", stringify!($acc), "` option group (see [`cli_args!`](crate::cli_args)).")]
        #[derive(Debug, Clone)]
        pub struct $gstruct {
            $($(#[doc = $doc])* pub $field: $($ty)*,)*
        }
    };

    // ---- The groups: each option's one definition. ----
    (@group server [$($k:tt)*]) => { $crate::cli_args!($($k)* server ServerArgs {
        /// use debug (per-request log lines)
        #[argh(switch, short = 'd')]
        debug: [bool],
        /// classes file (one ImageNet class name per line)
        #[argh(option, default = "::std::path::PathBuf::from(\"models/imagenet_classes.txt\")")]
        classes_file: [::std::path::PathBuf],
        /// model file (ONNX)
        #[argh(option, default = "::std::path::PathBuf::from(\"models/resnet50.onnx\")")]
        engine_file: [::std::path::PathBuf],
        /// engine contexts (each with its own CUDA stream and worker) per GPU; 0 = --workers
        /// (GPU backend; the CPU backend ignores it)
        #[argh(option, default = "0")]
        streams: [u32],
        /// number of worker threads, each with its own engine context
        #[argh(option, default = "1")]
        workers: [usize],
        /// logs folder
        #[argh(option, short = 'f', default = "::std::path::PathBuf::from(\"results\")")]
        folder: [::std::path::PathBuf],
        /// monitor interval in seconds (0 = off)
        #[argh(option, short = 'i', default = "20")]
        monitor_interval: [u64],
        /// save logs (per-request CSV in the logs folder at exit)
        #[argh(switch, short = 's')]
        save_logs: [bool],
        /// high priority clients: 1 = requests flagged priority jump the queue
        #[argh(option, default = "0")]
        priority_clients: [u8],
        /// per-request log capacity (requests recorded for -s)
        #[argh(option, default = "1000")]
        total_requests: [usize],
        /// requests queued per priority lane before new ones get Overloaded
        #[argh(option, default = "1024")]
        queue_depth: [usize],
        /// memory in MiB that requests accepted but not yet processed may hold, all clients
        /// together; one past it gets Overloaded at once (default 256)
        #[argh(option, default = "::hacserve_runtime::server::DEFAULT_MAX_QUEUED_MIB")]
        max_queued_mib: [usize],
        /// largest image accepted, in pixels (width x height from the JPEG header, read before
        /// decoding; default 24000000 = 6000x4000, at most 67108864 = 8192x8192); a larger one
        /// gets PayloadTooLarge
        #[argh(option, default = "::hacserve_runtime::preprocess::DEFAULT_MAX_IMAGE_PIXELS")]
        max_image_pixels: [usize],
        /// busy (spin), block (sleep when idle), hybrid (receive loop spins, workers sleep until a
        /// request is queued), event (rdma_server: the receive loop sleeps on completion
        /// channels, workers park; zmq_server: as block) or auto (busy with a core per thread,
        /// else hybrid with two cores)
        #[argh(option, default = "String::from(\"auto\")")]
        poll_mode: [String],
        /// inference backend, by its registry name (default cpu = tract); `--backend help` lists
        /// every registered backend with the options it reads
        #[argh(option, default = "String::from(\"cpu\")")]
        backend: [String],
        /// gpu backend precision: fp16 (NHWC, tensor cores), tf32 or fp32
        #[argh(option, default = "String::from(\"fp16\")")]
        precision: [String],
        /// GPUs for the gpu backend, comma-separated (workers are spread over them round-robin,
        /// each with its own engine context and stream)
        #[argh(option, default = "String::from(\"0\")")]
        gpus: [String],
        /// where the GPU backend decodes JPEGs: gpu (nvJPEG: its hardware backend for what it
        /// takes where the GPU has NVJPG engines, the hybrid backend for the rest), hybrid
        /// (nvJPEG's hybrid backend only) or cpu; all with the preprocessing kernel but cpu
        #[argh(option, default = "String::from(\"gpu\")")]
        decode: [String],
        /// GPU backend with GPU decode: JPEG requests ready together run as one batch of up to
        /// this many (1 = off; a lone request never waits for company unless
        /// --max-queue-delay-us says so)
        #[argh(option, default = "8")]
        max_batch: [usize],
        /// with --max-batch above 1: how long (microseconds) a worker holding a request waits
        /// for more to fill its batch, as Triton's dynamic batcher (0 = never wait)
        #[argh(option, default = "0")]
        max_queue_delay_us: [u64],
        /// with --max-batch above 1: smaller batch sizes with their own batch context and CUDA
        /// graph, a batch running on the smallest that holds it: auto (powers of two below
        /// --max-batch), none, or a comma-separated list
        #[argh(option, default = "String::from(\"auto\")")]
        preferred_batch_sizes: [String],
        /// with --max-batch above 1 and GPU decode: on = each worker keeps two sets of batch
        /// contexts and decodes + preprocesses its next batch while the last one runs on the
        /// GPU (answering it after), off (default: on the H200 it did not raise throughput)
        /// = each batch runs to its end before the next is taken
        #[argh(option, default = "String::from(\"off\")")]
        overlap_batches: [String],
        /// intra-op threads per worker for the CPU backend
        #[argh(option, default = "1")]
        threads: [usize],
        /// do not pin threads to cores
        #[argh(switch)]
        no_pin: [bool],
    }); };
    (@group check [$($k:tt)*]) => { $crate::cli_args!($($k)* check_group CheckArgs {
        /// print what this role loads at run time and where from (RDMA libraries, devices and
        /// ports; with --backend gpu the CUDA driver, GPUs, cuDNN, cuBLAS, NVRTC, nvJPEG),
        /// then exit: 0 when the role can run here, 1 naming what is missing
        #[argh(switch)]
        check: [bool],
    }); };
    (@group ring_limits [$($k:tt)*]) => { $crate::cli_args!($($k)* ring_limits RingLimits {
        /// largest request slot a client may ask for, in bytes (bounds header + payload)
        #[argh(option, default = "2 << 20")]
        slot_size: [u32],
        /// largest ring depth (requests in flight) a client may ask for
        #[argh(option, default = "64")]
        ring_depth: [u32],
        /// connections held at once; more are refused with the reason (default 64)
        #[argh(option, default = "::hacserve_runtime::transport::rdma::DEFAULT_MAX_CONNECTIONS")]
        max_connections: [u32],
        /// memory all connections' rings may register (pin), in MiB; a connection beyond it is
        /// refused with the reason (default 4096)
        #[argh(option, default = "::hacserve_runtime::transport::rdma::DEFAULT_MAX_PINNED_MIB")]
        max_pinned_mib: [u64],
        /// disconnect a client whose reply writes stay unacknowledged this long, in ms
        /// (0 = never; default 15000)
        #[argh(option, default = "::hacserve_runtime::transport::rdma::DEFAULT_PEER_TIMEOUT_MS")]
        peer_timeout_ms: [u64],
        /// grant the memory-polled fast path (small messages as a plain RDMA WRITE and a
        /// completion word the receiver polls) to clients that ask: on or off (default on;
        /// never granted with --poll-mode event)
        #[argh(option, default = "String::from(\"on\")")]
        fast_path: [String],
    }); };
    (@group client [$($k:tt)*]) => { $crate::cli_args!($($k)* client ClientArgs {
        /// server host
        #[argh(option, default = "String::from(\"7.7.7.2\")")]
        host: [String],
        /// image (JPEG; raw and processed decode it once, before the run)
        #[argh(option, short = 'i', default = "::std::path::PathBuf::from(\"models/grace_hopper_500x546.jpg\")")]
        image: [::std::path::PathBuf],
        /// use debug (a line per request)
        #[argh(switch, short = 'd')]
        debug: [bool],
        /// total requests
        #[argh(option, short = 'r', default = "1")]
        requests: [usize],
        /// client ID
        #[argh(option, default = "0")]
        client_id: [u32],
        /// task, as the original numbers them: 0|ping, 1|raw (client-decoded BGR pixels),
        /// 2|processed (client-preprocessed f32 tensor), 3|mixture (ping, raw, processed in
        /// turn); then 4|jpeg, 5|preprocess, 6|echo, 7|sink
        #[argh(option, short = 't', default = "::hacserve_runtime::protocol::Workload::Single(::hacserve_runtime::protocol::Task::Ping)", from_str_fn(::hacserve::cli::parse_task))]
        task: [::hacserve_runtime::protocol::Workload],
        /// ask for the 1000 logits in each inference's reply (4000 B, as the original
        /// replies) instead of the top-5 alone
        #[argh(switch)]
        logits: [bool],
        /// save logs (per-request CSV and JSON summary in the logs folder)
        #[argh(switch, short = 's')]
        save_logs: [bool],
        /// logs folder
        #[argh(option, short = 'f', default = "::std::path::PathBuf::from(\"results\")")]
        folder: [::std::path::PathBuf],
        /// model name (recorded in the summary; the server serves one model)
        #[argh(option, default = "String::from(\"resnet50\")")]
        model_name: [String],
        /// requests sent first and not measured
        #[argh(option, default = "0")]
        warmup: [usize],
        /// echo and sink tasks only: send this many zero bytes instead of the image
        #[argh(option)]
        payload_size: [Option<usize>],
        /// ask for the high-priority lane
        #[argh(switch)]
        priority: [bool],
        /// classes file, to print the top-1 class name
        #[argh(option, default = "::std::path::PathBuf::from(\"models/imagenet_classes.txt\")")]
        classes_file: [::std::path::PathBuf],
        /// after the server went away mid-run, how long to keep trying to connect again
        /// before the run fails, in ms; the request is then sent again (0 = never; ZeroMQ
        /// reconnects by itself)
        #[argh(option, default = "10000")]
        reconnect_ms: [u64],
    }); };
    (@group metrics [$($k:tt)*]) => { $crate::cli_args!($($k)* metrics MetricsArgs {
        /// resources sample period in ms (resources.csv with -s; the metrics endpoint)
        #[argh(option, default = "20")]
        sample_ms: [u64],
        /// serve Prometheus text on this port (GET /metrics; 0 = any free port, printed)
        #[argh(option)]
        metrics_port: [Option<u16>],
        /// address the metrics endpoint binds
        #[argh(option, default = "String::from(\"0.0.0.0\")")]
        metrics_address: [String],
    }); };
    (@group proxy [$($k:tt)*]) => { $crate::cli_args!($($k)* proxy ProxyArgs {
        /// backend RDMA server address
        #[argh(option, default = "String::from(\"7.7.7.2\")")]
        server_address: [String],
        /// use debug (a line per request)
        #[argh(switch, short = 'd')]
        debug: [bool],
        /// total requests (informational: the proxy forwards until stopped)
        #[argh(option, short = 'r', default = "1000000")]
        requests: [usize],
        /// task (informational: the proxy forwards every task, as with the original's
        /// default 3, mixture)
        #[argh(option, short = 't', default = "::hacserve_runtime::protocol::Workload::Mixture", from_str_fn(::hacserve::cli::parse_task))]
        task: [::hacserve_runtime::protocol::Workload],
        /// save logs (informational: the proxy keeps no per-request log)
        #[argh(switch, short = 's')]
        save_logs: [bool],
        /// logs folder (informational)
        #[argh(option, short = 'f', default = "::std::path::PathBuf::from(\"results\")")]
        folder: [::std::path::PathBuf],
        /// model name (informational)
        #[argh(option, default = "String::from(\"resnet50\")")]
        model_name: [String],
        /// requests waiting for the forwarder (and for a free backend slot) before new ones
        /// are answered Overloaded
        #[argh(option, default = "1024")]
        queue_depth: [usize],
        /// busy (spin), block, event (rdma_proxy: its receive loop sleeps on completion
        /// channels; the forwarder waits as in block) or auto
        #[argh(option, default = "String::from(\"auto\")")]
        poll_mode: [String],
        /// where the forwarder runs: thread (its own polling thread beside the receive
        /// loop), inline (inside the receive loop: one polling thread for both sides) or
        /// auto (thread when the poll mode is busy, else inline; with --poll-mode auto too:
        /// busy and thread from three cores, busy and inline on two, block and inline on one)
        #[argh(option, default = "String::from(\"auto\")")]
        forwarder: [String],
        /// address to bind
        #[argh(option, default = "String::from(\"0.0.0.0\")")]
        bind_address: [String],
        /// backend connection set-up timeout in ms
        #[argh(option, default = "10000")]
        timeout_ms: [u64],
        /// each request's deadline in ms: a request the backend has not answered by then
        /// gets a Timeout error from the proxy (its late answer is dropped)
        #[argh(option, default = "10000")]
        request_timeout_ms: [u64],
    }); };
}

cli_args!(@group server [@define]);
cli_args!(@group ring_limits [@define]);
cli_args!(@group check [@define]);
cli_args!(@group client [@define]);
cli_args!(@group proxy [@define]);
cli_args!(@group metrics [@define]);

/// Parses an on/off option (`--fast-path`).
pub fn on_off(value: &str, option: &str) -> anyhow::Result<bool> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => anyhow::bail!("{option} must be on or off, not {other:?}"),
    }
}

impl RingLimits {
    /// The wire format's limits ([`check_geometry`]) and the entry limits' ranges.
    pub fn check(&self) -> Result<()> {
        check_geometry(self.ring_depth, self.slot_size)?;
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        if self.max_pinned_mib == 0 {
            anyhow::bail!("--max-pinned-mib must be at least 1");
        }
        on_off(&self.fast_path, "--fast-path")?;
        Ok(())
    }

    /// The listening side's configuration with these limits; `events`: the receive loop
    /// sleeps on completion channels (`--poll-mode event`).
    pub fn server_config(
        &self,
        keep_alive: bool,
        addressing: Addressing,
        events: bool,
    ) -> RdmaServerConfig {
        RdmaServerConfig {
            fast_path: self.fast_path == "on",
            events,
            max_slot_size: self.slot_size,
            max_depth: self.ring_depth,
            max_connections: self.max_connections,
            max_pinned_bytes: self.max_pinned_mib.saturating_mul(1 << 20),
            peer_timeout: (self.peer_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.peer_timeout_ms)),
            keep_alive,
            addressing,
            host_ring_cuda: None,
        }
    }

    /// "slots up to D x S B, N connections, M MiB pinned, peer timeout T ms": for banners.
    pub fn describe(&self) -> String {
        let timeout = match self.peer_timeout_ms {
            0 => "no peer timeout".to_string(),
            t => format!("peer timeout {t} ms"),
        };
        format!(
            "slots up to {} x {} B, up to {} connections and {} MiB pinned, {timeout}",
            self.ring_depth, self.slot_size, self.max_connections, self.max_pinned_mib
        )
    }
}

/// What every role does first: logging at its level and the SIGINT/SIGTERM stop flag.
pub fn init(debug: bool) {
    logging::init(debug);
    signal::install_stop_handler();
}

/// `-t`'s parser (numbers or names).
pub fn parse_task(s: &str) -> Result<Workload, String> {
    Workload::parse(s)
}

/// `--bind-address` of the RDMA listeners, which bind an IP, not a host name.
pub fn bind_ip(bind_address: &str) -> Result<IpAddr> {
    bind_address
        .parse()
        .with_context(|| format!("--bind-address {bind_address:?} is not an IP address"))
}
