//! Checkpoints of a tree that a real writer thread keeps changing: what is published restores to
//! exactly the tree as it stood while the writer was paused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::tests::{Env, assert_no_spools, describe_tree, id, random_bytes};
use super::*;
use crate::util::error_chain;

type Tree = BTreeMap<String, (String, u32, u64, i64, Vec<u8>)>;

/// A writer that, step after step, writes N to `a` then to `b`, and every 7th step replaces
/// the dir `d`; it stops only between steps.
struct Writer {
    gate: Arc<(Mutex<Gate>, Condvar)>,
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Gate {
    pause_asked: bool,
    idle: bool,
}

impl Writer {
    fn start(root: &Path) -> Self {
        let gate = Arc::new((Mutex::new(Gate::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let (g, s, n, root) = (
            gate.clone(),
            stop.clone(),
            steps.clone(),
            root.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            let mut step = 0u64;
            while !s.load(Ordering::SeqCst) {
                {
                    let (lock, cv) = &*g;
                    let mut st = lock.lock().unwrap();
                    while st.pause_asked {
                        st.idle = true;
                        cv.notify_all();
                        st = cv.wait(st).unwrap();
                    }
                    st.idle = false;
                }
                step += 1;
                std::fs::write(root.join("a"), step.to_string()).unwrap();
                std::fs::write(root.join("b"), step.to_string()).unwrap();
                if step.is_multiple_of(7) {
                    let d = root.join("d");
                    if d.exists() {
                        std::fs::remove_dir_all(&d).unwrap();
                    }
                    std::fs::create_dir(&d).unwrap();
                    std::fs::write(d.join(format!("f{step}")), vec![1u8; 3000]).unwrap();
                }
                n.store(step, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        Self {
            gate,
            stop,
            steps,
            thread: Some(thread),
        }
    }

    fn quiesce(&self, root: &Path, delay: Duration) -> Arc<Pauser> {
        Arc::new(Pauser {
            gate: self.gate.clone(),
            root: root.to_path_buf(),
            seen: Mutex::new(None),
            delay,
            resumed: AtomicBool::new(true),
        })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let (lock, cv) = &*self.gate;
        lock.lock().unwrap().pause_asked = false;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Pauses the writer between steps and records the tree as it is while paused.
struct Pauser {
    gate: Arc<(Mutex<Gate>, Condvar)>,
    root: PathBuf,
    seen: Mutex<Option<Tree>>,
    /// Extra time the pause takes to be reached (a slow freezer).
    delay: Duration,
    resumed: AtomicBool,
}

struct Held(
    Arc<(Mutex<Gate>, Condvar)>,
    Option<Arc<Pauser>>,
    std::time::Instant,
);

impl Held {
    fn release(&mut self) {
        if let Some(p) = self.1.take() {
            let (lock, cv) = &*self.0;
            lock.lock().unwrap().pause_asked = false;
            cv.notify_all();
            p.resumed.store(true, Ordering::SeqCst);
        }
    }
}

impl Paused for Held {
    fn since(&self) -> std::time::Instant {
        self.2
    }

    fn resume(mut self: Box<Self>) -> Result<Duration, QuiesceError> {
        self.release();
        Ok(self.2.elapsed())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release();
    }
}

struct PauserRef(Arc<Pauser>);

impl Quiesce for PauserRef {
    fn pause(&self, _budget: Duration) -> Result<Box<dyn Paused>, QuiesceError> {
        let p = &self.0;
        let asked = std::time::Instant::now();
        let (lock, cv) = &*p.gate;
        let mut st = lock.lock().unwrap();
        st.pause_asked = true;
        st.idle = false;
        p.resumed.store(false, Ordering::SeqCst);
        cv.notify_all();
        while !st.idle {
            let (next, timeout) = cv.wait_timeout(st, Duration::from_secs(5)).unwrap();
            st = next;
            if timeout.timed_out() {
                break;
            }
        }
        drop(st);
        std::thread::sleep(p.delay);
        *p.seen.lock().unwrap() = Some(describe_tree(&p.root));
        Ok(Box::new(Held(p.gate.clone(), Some(p.clone()), asked)))
    }
}

async fn node(env: &Env, name: &str) -> LayerSyncManager {
    LayerSyncManager::with_store(env.config(name), Arc::clone(&env.store))
        .await
        .unwrap()
}

fn opts(budget_ms: u64) -> CheckpointOptions {
    CheckpointOptions {
        seq: None,
        base: None,
        pause_budget: Duration::from_millis(budget_ms),
    }
}

fn seed(upper: &Path) {
    std::fs::create_dir_all(upper.join("data")).unwrap();
    for i in 0..40 {
        std::fs::write(upper.join(format!("data/{i}.bin")), random_bytes(200_000)).unwrap();
    }
}

/// The first checkpoint (no version yet: a full first pass) and the next (a delta first pass)
/// each restore on another node to exactly the tree seen while the writer was paused, with
/// `a` and `b` from the same step, although the writer ran throughout both first passes.
#[tokio::test]
async fn a_checkpoint_of_a_tree_being_written_restores_the_paused_instant() {
    let env = Env::new();
    let a = node(&env, "a").await;
    let b = node(&env, "b").await;
    let upper = env.path("upper");
    seed(&upper);
    // Past the racy margin, so that later checkpoints need not send the seeded files again.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let writer = Writer::start(&upper);
    let pauser = writer.quiesce(&upper, Duration::ZERO);
    for round in 0..3 {
        if round == 2 {
            // Bytes the next first pass must carry, written while it may already run.
            std::fs::write(upper.join("data/0.bin"), random_bytes(200_000)).unwrap();
        }
        let before = writer.steps.load(Ordering::SeqCst);
        let out = a
            .checkpoint_layer(
                &id("0"),
                &upper,
                opts(10_000),
                Arc::new(PauserRef(pauser.clone())),
            )
            .await
            .unwrap();
        assert!(pauser.resumed.load(Ordering::SeqCst), "round {round}");
        assert!(out.sync.manifest_moved, "round {round}: {out:?}");
        let seen = pauser.seen.lock().unwrap().take().unwrap();
        let target = env.path(&format!("restored-{round}"));
        b.restore_layer(&id("0"), &target).await.unwrap().unwrap();
        let restored = describe_tree(&target);
        assert_eq!(restored.get("a"), restored.get("b"), "round {round}");
        assert_eq!(restored, seen, "round {round}");
        let m = a.manifest(&id("0")).await.unwrap().unwrap();
        if round == 0 {
            assert!(m.current.chain.len() <= 1, "{:?}", m.current.chain);
        } else {
            // Each checkpoint adds at most its two passes to the chain.
            assert!(
                m.current.chain.len() <= 2 * round + 1,
                "{:?}",
                m.current.chain
            );
            assert!(out.running_bytes + out.frozen_bytes < 2_000_000, "{out:?}");
        }
        assert!(
            writer.steps.load(Ordering::SeqCst) > before,
            "the writer ran"
        );
    }
    drop(writer);
    assert_no_spools(&env, "a");
}

/// A pause that is reached too late for the budget: the writer is resumed, nothing is
/// published, no spool stays behind; the next checkpoint with room succeeds.
#[tokio::test]
async fn a_checkpoint_over_its_pause_budget_publishes_nothing_and_resumes_the_writer() {
    let env = Env::new();
    let a = node(&env, "a").await;
    let upper = env.path("upper");
    seed(&upper);
    let first = a.sync_layer(&id("0"), &upper).await.unwrap();
    let writer = Writer::start(&upper);
    let slow = writer.quiesce(&upper, Duration::from_millis(60));
    let err = a
        .checkpoint_layer(
            &id("0"),
            &upper,
            opts(20),
            Arc::new(PauserRef(slow.clone())),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, LayerError::PauseBudget { .. }), "{err:?}");
    assert!(error_chain(&err).contains("20 ms"), "{}", error_chain(&err));
    assert!(slow.resumed.load(Ordering::SeqCst));
    let m = a.manifest(&id("0")).await.unwrap().unwrap();
    assert_eq!(m.current.digest, first.digest);
    assert_no_spools(&env, "a");
    let before = writer.steps.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        writer.steps.load(Ordering::SeqCst) > before,
        "writer resumed"
    );

    let quick = writer.quiesce(&upper, Duration::ZERO);
    let out = a
        .checkpoint_layer(&id("0"), &upper, opts(10_000), Arc::new(PauserRef(quick)))
        .await
        .unwrap();
    assert!(out.sync.manifest_moved);
    drop(writer);
    assert_no_spools(&env, "a");
}

struct Refuses;

impl Quiesce for Refuses {
    fn pause(&self, budget: Duration) -> Result<Box<dyn Paused>, QuiesceError> {
        Err(format!("cgroup did not freeze within {} ms", budget.as_millis()).into())
    }
}

/// A pause that fails: the error says why, and nothing is published or left behind.
#[tokio::test]
async fn a_checkpoint_whose_pause_fails_publishes_nothing() {
    let env = Env::new();
    let a = node(&env, "a").await;
    let upper = env.path("upper");
    seed(&upper);
    let err = a
        .checkpoint_layer(&id("0"), &upper, opts(200), Arc::new(Refuses))
        .await
        .unwrap_err();
    let msg = error_chain(&err);
    assert!(msg.contains("did not freeze within 200 ms"), "{msg}");
    assert!(a.manifest(&id("0")).await.unwrap().is_none());
    assert_no_spools(&env, "a");
}
