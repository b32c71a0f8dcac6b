//! Fault injection for tests: panics at named places of one server, so the tests can
//! check that a crash is contained where it happens (a 500 for a request, a restarted
//! store writer, a restarted job supervisor) and loses nothing.
//!
//! A `Faults` is part of one server's `Config` (tests build it directly; no flag or
//! variable sets it), so a fault armed for one server never touches another server in
//! the same test process. Each armed fault fires once per count and then disarms
//! itself. Unarmed, a check is one atomic load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Inside a `/v1` request's handling, before the handler runs.
    Request,
    /// The redb writer thread, after a batch was applied and before it commits.
    StoreWriter,
    /// A job's supervisor, as it starts driving the job.
    JobSupervisor,
}

const POINTS: usize = 3;

/// Armed faults, shared by every part of one server. Cheap to clone.
#[derive(Clone, Default)]
pub struct Faults(Arc<[AtomicU32; POINTS]>);

impl Faults {
    /// The next `times` passes through `point` panic.
    pub fn arm(&self, point: Point, times: u32) {
        self.0[point as usize].store(times, Ordering::SeqCst);
    }

    /// Panics if a fault is armed at `point` (and counts it down).
    pub fn check(&self, point: Point) {
        let armed = &self.0[point as usize];
        if armed.load(Ordering::Relaxed) == 0 {
            return;
        }
        let fired = armed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fired {
            panic!("fault injected at {point:?}");
        }
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let armed: Vec<u32> = self.0.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        f.debug_tuple("Faults").field(&armed).finish()
    }
}
