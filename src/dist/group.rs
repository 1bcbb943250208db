//! [`Group`]: one process's handle on a c10d process group, with a heartbeat in the rendezvous
//! store so that a failed collective can name the rank that stopped.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use super::{DistError, LaunchEnv};

extern "C" {
    fn vla_dist_new(
        backend: *const c_char,
        addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        host_store: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        bind_loopback: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn vla_dist_free(group: *mut c_void);
    fn vla_dist_allreduce(
        group: *mut c_void,
        tensors: *mut *mut torch_sys::C_tensor,
        n: c_int,
        op: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn vla_dist_broadcast(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn vla_dist_store_add(
        group: *mut c_void,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Heartbeat period; a rank whose counter does not move over [`SILENCE`] is reported dead.
const BEAT: Duration = Duration::from_millis(500);
const SILENCE: Duration = Duration::from_secs(3);

/// Reduction of [`Group::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

struct Handle(*mut c_void);
// SAFETY: c10d's backend and store are used from several threads in PyTorch too; the store's
// client serializes its operations, and collectives are issued from one thread (the loop's).
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// A joined process group; see the module doc. Dropping it stops the heartbeat and leaves.
pub struct Group {
    handle: Arc<Handle>,
    rank: usize,
    world: usize,
    backend: String,
    store_host: String,
    collectives: AtomicU64,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({} rank {} of {})", self.backend, self.rank, self.world)
    }
}

fn err_buf() -> [c_char; 1024] {
    [0; 1024]
}

fn err_text(buf: &[c_char]) -> String {
    // SAFETY: the shim NUL-terminates what it writes; the buffer starts zeroed.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

impl Group {
    /// Joins the `backend` ("gloo") group of `env`'s launch; collectives fail after `timeout`.
    /// Rank 0 hosts the rendezvous store unless torchrun's agent does.
    pub fn join(env: &LaunchEnv, backend: &str, timeout: Duration) -> Result<Self, DistError> {
        let join_err = |reason: String| DistError::Join {
            backend: backend.to_string(),
            rank: env.rank,
            world: env.world_size,
            addr: env.master_addr.clone(),
            port: env.master_port,
            reason,
        };
        let prefix = match env.agent_store {
            Some(attempt) => format!("/worker/attempt_{attempt}/vla_finetune/"),
            None => "vla_finetune/".to_string(),
        };
        let cstr = |s: &str| CString::new(s).map_err(|_| join_err(format!("`{s}` contains a NUL byte")));
        let (b, addr, prefix) = (cstr(backend)?, cstr(&env.master_addr)?, cstr(&prefix)?);
        let bind_loopback = env.is_loopback() && std::env::var_os("GLOO_SOCKET_IFNAME").is_none();
        let host_store = env.agent_store.is_none() && env.rank == 0;
        let mut err = err_buf();
        // SAFETY: every pointer is a live NUL-terminated string or the error buffer of its length.
        let ptr = unsafe {
            vla_dist_new(
                b.as_ptr(),
                addr.as_ptr(),
                c_int::from(env.master_port),
                env.rank as c_int,
                env.world_size as c_int,
                c_int::from(host_store),
                prefix.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                c_int::from(bind_loopback),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if ptr.is_null() {
            return Err(join_err(err_text(&err)));
        }
        let store_host =
            if host_store || env.agent_store.is_none() { "rank 0".to_string() } else { "torchrun's agent".to_string() };
        let mut group = Self {
            handle: Arc::new(Handle(ptr)),
            rank: env.rank,
            world: env.world_size,
            backend: backend.to_string(),
            store_host: format!("{store_host} ({}:{})", env.master_addr, env.master_port),
            collectives: AtomicU64::new(0),
            stop: Arc::new(AtomicBool::new(false)),
            heartbeat: None,
        };
        group.heartbeat = Some(group.start_heartbeat());
        Ok(group)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Whether this is rank 0 (the one that writes, publishes and reports).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Collectives issued so far by this process.
    pub fn collectives(&self) -> u64 {
        self.collectives.load(Ordering::Relaxed)
    }

    /// All-reduces `tensors` in place (every rank passes the same shapes, in the same order).
    pub fn all_reduce(&self, tensors: &mut [Tensor], op: ReduceOp) -> Result<(), DistError> {
        let mut ptrs: Vec<*mut torch_sys::C_tensor> = tensors.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let mut err = err_buf();
        self.collectives.fetch_add(1, Ordering::Relaxed);
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        };
        // SAFETY: live group and tensors; the error buffer has its length.
        let rc = unsafe {
            vla_dist_allreduce(self.handle.0, ptrs.as_mut_ptr(), ptrs.len() as c_int, code, err.as_mut_ptr(), err.len())
        };
        if rc != 1 {
            return Err(self.failed("all-reduce", err_text(&err)));
        }
        Ok(())
    }

    /// Overwrites `tensor` on every rank with rank `root`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        let mut err = err_buf();
        self.collectives.fetch_add(1, Ordering::Relaxed);
        // SAFETY: live group and tensor; the error buffer has its length.
        let rc = unsafe {
            vla_dist_broadcast(self.handle.0, tensor.as_mut_ptr(), root as c_int, err.as_mut_ptr(), err.len())
        };
        if rc != 1 {
            return Err(self.failed("broadcast", err_text(&err)));
        }
        Ok(())
    }

    /// [`Group::all_reduce`] of a few numbers (f64 on the CPU).
    pub fn all_reduce_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>, DistError> {
        let mut t = [Tensor::from_slice(values).to_kind(Kind::Double)];
        self.all_reduce(&mut t, op)?;
        Ok(Vec::<f64>::try_from(&t[0]).unwrap_or_default())
    }

    /// Rank 0's `bytes` on every rank (others pass anything; only rank 0's are sent).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>, DistError> {
        let mut len = Tensor::from_slice(&[bytes.len() as i64]);
        self.broadcast(&mut len, 0)?;
        let n = len.int64_value(&[0]) as usize;
        let mut data = if self.is_main() {
            Tensor::from_slice(bytes)
        } else {
            Tensor::zeros([n as i64], (Kind::Uint8, Device::Cpu))
        };
        self.broadcast(&mut data, 0)?;
        Ok(Vec::<u8>::try_from(&data).unwrap_or_default())
    }

    /// Waits until every rank reaches it.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.all_reduce_f64(&[0.0], ReduceOp::Sum).map(|_| ())
    }

    fn start_heartbeat(&self) -> JoinHandle<()> {
        let (handle, stop, key) = (self.handle.clone(), self.stop.clone(), beat_key(self.rank));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if store_add(&handle, &key, 1).is_err() {
                    return;
                }
                std::thread::sleep(BEAT);
            }
        })
    }

    /// The error of a failed `op`, naming the ranks whose heartbeat stopped (or the store's host
    /// when the store itself is gone).
    fn failed(&self, op: &'static str, cause: String) -> DistError {
        let cause = cause.lines().next().unwrap_or_default().to_string();
        let reason = match self.silent_ranks() {
            Ok(dead) if !dead.is_empty() => {
                let names: Vec<String> = dead.iter().map(|r| format!("rank {r}")).collect();
                format!(
                    "{} of {} stopped (no heartbeat for {} s): {cause}",
                    names.join(", "),
                    self.world,
                    SILENCE.as_secs()
                )
            }
            Ok(_) => format!("{cause} (every rank's heartbeat is alive: a collective timed out or the ranks disagree)"),
            Err(store) => format!(
                "the rendezvous store hosted by {} is unreachable, so that host stopped ({store}): {cause}",
                self.store_host
            ),
        };
        DistError::Collective { op, rank: self.rank, reason }
    }

    /// Ranks whose heartbeat counter does not move over [`SILENCE`].
    fn silent_ranks(&self) -> Result<Vec<usize>, String> {
        let read =
            || (0..self.world).map(|r| store_add(&self.handle, &beat_key(r), 0)).collect::<Result<Vec<i64>, String>>();
        let before = read()?;
        std::thread::sleep(SILENCE);
        let after = read()?;
        Ok((0..self.world).filter(|&r| r != self.rank && after[r] == before[r]).collect())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
        // SAFETY: the heartbeat thread (the only other user of the handle) has ended.
        unsafe { vla_dist_free(self.handle.0) };
    }
}

fn beat_key(rank: usize) -> CString {
    CString::new(format!("heartbeat/{rank}")).expect("no NUL")
}

fn store_add(handle: &Handle, key: &CString, delta: i64) -> Result<i64, String> {
    let (mut out, mut err) = (0i64, err_buf());
    // SAFETY: live group; `key` NUL-terminated; `out` and the error buffer are writable.
    let rc = unsafe { vla_dist_store_add(handle.0, key.as_ptr(), delta, &mut out, err.as_mut_ptr(), err.len()) };
    if rc == 1 {
        Ok(out)
    } else {
        Err(err_text(&err))
    }
}
