//! Choosing what a restore reads, from the manifest alone: the generation, the snapshot to
//! start from, where to stop, and which segments and index chunks that takes.

use super::{RestoreError, Result};
use crate::replicator::manifest::{
    self, ChunkRef, Generation, IndexChunk, MANIFEST_KEY, Manifest, Parent, SegmentEntry, Snapshot,
};

/// What to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The last generation's last stored transaction.
    Latest,
    /// The state right after transaction `txid` of `generation` (default: the last one).
    Txid {
        generation: Option<String>,
        txid: u64,
    },
    /// The state at this instant (unix ns): every transaction committed by then, in the most
    /// recent generation that existed then.
    Time(i64),
}

/// Where a restore stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Right after this transaction.
    Txid(u64),
    /// After the last transaction committed at or before `unix_ns`. Commit times only show
    /// after a transaction's pages, so that one is found by reading the segment ending at
    /// `bound` (the first whose last commit is later): nothing after `bound` is needed.
    Time { unix_ns: i64, bound: u64 },
}

impl Stop {
    /// The last transaction that may be needed.
    #[must_use]
    pub fn upper(self) -> u64 {
        match self {
            Self::Txid(txid) => txid,
            Self::Time { bound, .. } => bound,
        }
    }
}

/// Which history, starting point and stop a target means, decided from the manifest alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub generation: String,
    /// The generation's page size.
    pub page_size: u32,
    /// The snapshot to start from.
    pub snapshot: Snapshot,
    pub stop: Stop,
    /// The generation's last stored transaction (its last segment's, or a later snapshot's).
    pub end: u64,
}

/// Chooses the generation, the snapshot to start from and where to stop.
///
/// - `Latest`: the last generation, to its end, from its last snapshot.
/// - `Txid`: that generation, from its latest snapshot at or before `txid`, to exactly `txid`.
/// - `Time(t)`: the most recent generation whose base snapshot is not later than `t`, from its
///   latest snapshot not later than `t`, through every transaction committed by `t` (commit
///   times do not decrease within a generation); its end when `t` is past it.
pub fn plan(manifest: &Manifest, target: &Target) -> Result<Plan> {
    let (generation, snapshot, stop) = match target {
        Target::Latest => {
            let g = manifest.current().ok_or(RestoreError::NoGeneration)?;
            checked(g)?;
            let (end, _) = end_of(g);
            (g, latest_snapshot(g, |s| s.txid <= end), Stop::Txid(end))
        }
        Target::Txid { generation, txid } => {
            let g = match generation {
                Some(id) => {
                    manifest
                        .generation(id)
                        .ok_or_else(|| RestoreError::UnknownGeneration {
                            generation: id.clone(),
                        })?
                }
                None => manifest.current().ok_or(RestoreError::NoGeneration)?,
            };
            let base = checked(g)?.txid;
            let (end, _) = end_of(g);
            let txid = *txid;
            if txid < base {
                return Err(RestoreError::BeforeStart {
                    generation: g.id.clone(),
                    txid,
                    base,
                });
            }
            if txid > end {
                return Err(RestoreError::PastEnd {
                    generation: g.id.clone(),
                    txid,
                    last: end,
                });
            }
            if txid > g.last_txid() && g.snapshots.iter().all(|s| s.txid != txid) {
                return Err(RestoreError::NotStored {
                    generation: g.id.clone(),
                    txid,
                    last: g.last_txid(),
                });
            }
            (g, latest_snapshot(g, |s| s.txid <= txid), Stop::Txid(txid))
        }
        Target::Time(unix_ns) => {
            let unix_ns = *unix_ns;
            let mut found = None;
            for g in manifest.generations.iter().rev() {
                if checked(g)?.committed_unix_ns <= unix_ns {
                    found = Some(g);
                    break;
                }
            }
            let g = found.ok_or(RestoreError::NothingAt { unix_ns })?;
            let snapshot = latest_snapshot(g, |s| s.committed_unix_ns <= unix_ns);
            let stop = time_stop(g, snapshot, unix_ns);
            (g, snapshot, stop)
        }
    };
    Ok(Plan {
        generation: generation.id.clone(),
        page_size: generation.page_size,
        snapshot: snapshot.clone(),
        stop,
        end: end_of(generation).0,
    })
}

/// The plan that builds the state `child`'s delta snapshot applies to: the parent generation
/// from the full snapshot the delta was computed against, to exactly its transaction.
pub fn parent_plan(manifest: &Manifest, child: &Plan, p: &Parent) -> Result<Plan> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        key: MANIFEST_KEY.to_string(),
        reason: format!(
            "generation {}'s base is a delta on generation {} after transaction {}: {reason}",
            child.generation, p.generation, p.txid
        ),
    };
    let g = manifest
        .generation(&p.generation)
        .ok_or_else(|| corrupt("that generation is not listed".to_string()))?;
    checked(g)?;
    if g.page_size != child.page_size {
        return Err(corrupt(format!("its page size is {}", g.page_size)));
    }
    let snapshot = g
        .snapshots
        .iter()
        .find(|s| s.txid == p.snapshot && s.parent.is_none())
        .ok_or_else(|| corrupt(format!("its full snapshot at {} is not listed", p.snapshot)))?;
    let (end, _) = end_of(g);
    if p.txid < p.snapshot || p.txid > end {
        return Err(corrupt(format!(
            "it has transactions {}..={end}",
            snapshot.txid
        )));
    }
    Ok(Plan {
        generation: g.id.clone(),
        page_size: g.page_size,
        snapshot: snapshot.clone(),
        stop: Stop::Txid(p.txid),
        end,
    })
}

/// The generation's base snapshot, once its id is known to be usable as a lineage and its page
/// size as SQLite's.
fn checked(g: &Generation) -> Result<&Snapshot> {
    let corrupt = |reason: String| RestoreError::Corrupt {
        key: MANIFEST_KEY.to_string(),
        reason,
    };
    if !manifest::is_generation_id(&g.id) {
        return Err(corrupt(format!("generation id {:?}", g.id)));
    }
    if !(512..=65536).contains(&g.page_size) || !g.page_size.is_power_of_two() {
        return Err(corrupt(format!(
            "generation {} has page size {}",
            g.id, g.page_size
        )));
    }
    g.snapshots
        .first()
        .ok_or_else(|| corrupt(format!("generation {} has no snapshot", g.id)))
}

/// The snapshot with the largest txid among those `ok` accepts (the base is always accepted
/// by the callers' checks).
fn latest_snapshot(g: &Generation, ok: impl Fn(&Snapshot) -> bool) -> &Snapshot {
    g.snapshots
        .iter()
        .filter(|s| ok(s))
        .max_by_key(|s| s.txid)
        .unwrap_or(&g.snapshots[0])
}

/// The last transaction a generation can be restored to and its commit time: its last stored
/// one, or a snapshot taken after it (before the segments reaching it were listed).
fn end_of(g: &Generation) -> (u64, i64) {
    let mut end = (g.last_txid(), g.last_unix_ns());
    for s in &g.snapshots {
        if s.txid > end.0 {
            end = (s.txid, s.committed_unix_ns);
        }
    }
    end
}

fn time_stop(g: &Generation, snapshot: &Snapshot, unix_ns: i64) -> Stop {
    let (end, end_unix_ns) = end_of(g);
    if unix_ns >= end_unix_ns {
        return Stop::Txid(end);
    }
    let ranges = g.chunks.iter().map(|c| (c.last, c.last_unix_ns));
    let ranges = ranges.chain(g.segments.iter().map(|s| (s.last, s.last_unix_ns)));
    let mut later = ranges.filter(|&(last, at)| last > snapshot.txid && at > unix_ns);
    match later.next() {
        Some((bound, _)) => Stop::Time { unix_ns, bound },
        // Only a snapshot past the segments is later: the segments are all there is.
        None => Stop::Txid(g.last_txid().max(snapshot.txid)),
    }
}

/// Whether the transactions `first..=last` include any the plan applies.
pub(super) fn wanted(plan: &Plan, first: u64, last: u64) -> bool {
    let upper = plan.stop.upper();
    upper > plan.snapshot.txid && last > plan.snapshot.txid && first <= upper
}

/// The segments to apply, in order, checked to cover everything from the snapshot to the stop.
/// For a time, that ends with the first segment whose last commit is later (an index chunk's
/// entries narrow down what the manifest's chunk reference could only bound).
pub(super) fn covering(
    plan: &Plan,
    entries: impl IntoIterator<Item = SegmentEntry>,
) -> std::result::Result<Vec<SegmentEntry>, String> {
    let mut picked: Vec<SegmentEntry> = entries
        .into_iter()
        .filter(|e| wanted(plan, e.first, e.last))
        .collect();
    let upper = match plan.stop {
        Stop::Txid(txid) => txid,
        Stop::Time { unix_ns, bound } => {
            match picked.iter().position(|e| e.last_unix_ns > unix_ns) {
                Some(i) => {
                    picked.truncate(i + 1);
                    picked[i].last
                }
                None => bound,
            }
        }
    };
    let mut next = plan.snapshot.txid + 1;
    for (i, e) in picked.iter().enumerate() {
        if e.first > next || (i > 0 && e.first != next) || e.last < e.first {
            return Err(format!(
                "generation {}: segment {}..={} where transaction {next} comes next",
                plan.generation, e.first, e.last
            ));
        }
        next = e.last.saturating_add(1);
    }
    if upper > plan.snapshot.txid && next <= upper {
        return Err(format!(
            "generation {}: segments end at transaction {}, before {upper}",
            plan.generation,
            next - 1
        ));
    }
    Ok(picked)
}

/// An index chunk must hold exactly the range its reference claims, without gaps.
pub(super) fn check_chunk(chunk: &ChunkRef, index: &IndexChunk) -> std::result::Result<(), String> {
    let mut next = chunk.first;
    for s in &index.segments {
        if s.first != next || s.last < s.first {
            return Err(format!(
                "segment {}..={} where transaction {next} comes next",
                s.first, s.last
            ));
        }
        next = s.last.saturating_add(1);
    }
    match index.segments.last() {
        None => Err("no segments".to_string()),
        Some(s) if s.last != chunk.last || s.last_unix_ns != chunk.last_unix_ns => Err(format!(
            "ends at transaction {} committed at {} ns; the manifest says {} at {} ns",
            s.last, s.last_unix_ns, chunk.last, chunk.last_unix_ns
        )),
        Some(_) => Ok(()),
    }
}
