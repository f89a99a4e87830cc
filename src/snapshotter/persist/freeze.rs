//! The container's cgroup freezer as a checkpoint's pause ([`Quiesce`]): the freeze is recorded
//! in `persist_frozen` (durably) before it happens and forgotten after the thaw, so a daemon
//! killed mid-pause thaws the container at its next start; a container its user paused is
//! captured as it is and never thawed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::layer::{Paused, Quiesce, QuiesceError};
use crate::sys::freezer::{FreezeState, Freezer, FrozenGuard};

use super::checkpoint::now_ns;
use super::checkpoint_db;
use super::{Persistence, error_chain, write_db};

/// The container's cgroup freezer as a checkpoint's pause; see the module docs.
pub(super) struct CgroupPause {
    persistence: Arc<Persistence>,
    freezer: Freezer,
    key: String,
    /// When the freeze was reached (unix ns), and whether the user had paused it already.
    paused_at: Mutex<Option<(i64, bool)>>,
}

impl CgroupPause {
    pub(super) fn new(persistence: Arc<Persistence>, freezer: Freezer, key: &str) -> Self {
        Self {
            persistence,
            freezer,
            key: key.to_string(),
            paused_at: Mutex::new(None),
        }
    }

    /// When the freeze was reached (unix ns) and whether the user had paused the container.
    pub(super) fn paused_at(&self) -> Option<(i64, bool)> {
        *self
            .paused_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cgroup(&self) -> String {
        self.freezer.dir().display().to_string()
    }

    fn unmark(&self) {
        let cgroup = self.cgroup();
        if let Ok(att) = self.persistence.attached()
            && let Err(e) = write_db(&att.db, "forget a freeze", |c| {
                checkpoint_db::unmark_frozen(c, &cgroup)
            })
        {
            tracing::warn!(cgroup, error = %error_chain(&e), "cannot forget a freeze (the next start thaws it again, harmlessly)");
        }
    }
}

impl Quiesce for CgroupPause {
    fn pause(&self, budget: Duration) -> std::result::Result<Box<dyn Paused>, QuiesceError> {
        // A container the user paused is already still: capture it as it is, never thaw it.
        if self.freezer.state()? == FreezeState::Frozen {
            let since = Instant::now();
            let guard = self.freezer.freeze(budget)?;
            if guard.already_frozen() {
                *self
                    .paused_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((now_ns(), true));
                return Ok(Box::new(Frozen {
                    guard: Some(guard),
                    owner: None,
                    since,
                }));
            }
            // Thawed between the two looks: ours now, so recorded like any freeze of ours.
            guard.thaw()?;
        }
        let att = self.persistence.attached()?;
        let cgroup = self.cgroup();
        write_db(&att.db, "record a freeze", |c| {
            checkpoint_db::mark_frozen(c, &cgroup, &self.key, now_ns())
        })?;
        let since = Instant::now();
        match self.freezer.freeze(budget) {
            Ok(guard) => {
                let user = guard.already_frozen();
                *self
                    .paused_at
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((now_ns(), user));
                let owner = if user {
                    self.unmark();
                    None
                } else {
                    Some(CgroupMark {
                        persistence: Arc::clone(&self.persistence),
                        cgroup,
                    })
                };
                Ok(Box::new(Frozen {
                    guard: Some(guard),
                    owner,
                    since,
                }))
            }
            Err(e) => {
                // The freezer thawed it again before failing.
                self.unmark();
                Err(Box::new(e))
            }
        }
    }
}

/// What forgets the freeze record once the cgroup is thawed.
struct CgroupMark {
    persistence: Arc<Persistence>,
    cgroup: String,
}

/// A freeze in force: `owner` is set when it is ours to thaw (and forget).
struct Frozen {
    guard: Option<FrozenGuard>,
    owner: Option<CgroupMark>,
    /// When the freeze was asked for.
    since: Instant,
}

impl Frozen {
    /// Thaws (unless the user's pause) and then forgets the record; returns how long the
    /// container was held by us.
    fn release(&mut self) -> std::result::Result<Duration, QuiesceError> {
        let Some(guard) = self.guard.take() else {
            return Ok(Duration::ZERO);
        };
        guard.thaw()?;
        let held = if self.owner.is_some() {
            self.since.elapsed()
        } else {
            Duration::ZERO
        };
        if let Some(mark) = self.owner.take()
            && let Ok(att) = mark.persistence.attached()
            && let Err(e) = write_db(&att.db, "forget a freeze", |c| {
                checkpoint_db::unmark_frozen(c, &mark.cgroup)
            })
        {
            tracing::warn!(cgroup = mark.cgroup, error = %error_chain(&e), "cannot forget a freeze (the next start thaws it again, harmlessly)");
        }
        Ok(held)
    }
}

impl Paused for Frozen {
    fn since(&self) -> Instant {
        self.since
    }

    fn resume(mut self: Box<Self>) -> std::result::Result<Duration, QuiesceError> {
        self.release()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(error = %e, "cannot thaw a container after a checkpoint");
        }
    }
}
