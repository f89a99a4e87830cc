//! The reading thread's output side: WAL events into the open segment, segments and snapshots
//! into the outbox, the saved state and the page map kept in step with them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{EngineConfig, MAX_SEGMENT, Result, Shared, io, now_ms, now_ns};
use crate::replicator::cache::{Cache, Item, ItemKind, LocalState, NewGeneration};
use crate::replicator::journal::{Journal, TailMeta};
use crate::replicator::manifest::{self, Parent};
use crate::replicator::pagemap::{self, PageHash, PageMap, Root};
use crate::replicator::segment::{SegmentHeader, SegmentWriter};
use crate::replicator::source::{Pumped, Source, SourceError};
use crate::replicator::wal::WalEvent;

/// zstd level of segments at most (snapshots take the configured one).
pub(super) const SEGMENT_LEVEL: i32 = 1;

/// A segment file ended but not yet in the outbox (see [`Output::read_tail`]).
#[derive(Debug)]
pub(super) struct Finished {
    path: PathBuf,
    meta: TailMeta,
}

/// What [`Output::snapshot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored {
    Snapshot,
    /// Asked for a new generation's base, it found the database equal to the saved state.
    Unchanged,
}

/// The segment being written.
#[derive(Debug)]
pub(super) struct Open {
    writer: SegmentWriter,
    path: PathBuf,
    first: u64,
    first_unix_ns: i64,
    last_unix_ns: i64,
    opened: Instant,
    /// A transaction has pages in the writer but no commit yet.
    in_txn: bool,
}

/// Everything but the source, so a barrier's closure can use it while the source is borrowed.
#[derive(Debug)]
pub(super) struct Output {
    pub(super) cfg: EngineConfig,
    pub(super) cache: Cache,
    pub(super) shared: Arc<Shared>,
    pub(super) state: LocalState,
    pub(super) open: Option<Open>,
    /// Hashes of the pages a restore of the saved state builds (`None`: not known, so the next
    /// break costs a full snapshot).
    pub(super) map: Option<PageMap>,
    /// Set when transactions read could not be kept (a segment had to be dropped): the history
    /// must restart from the database itself.
    pub(super) broken: Option<&'static str>,
    /// Where a barrier's tail goes durable fast (`None`: it could not be opened).
    pub(super) journal: Option<Journal>,
}

impl Output {
    /// Reads everything published and cuts it into the outbox (under a barrier: up to the WAL's
    /// end, with the pin there). A break in continuity is returned, not acted on.
    pub(super) fn read_all(&mut self, src: &mut Source) -> Result<Option<&'static str>> {
        if let Some(reason) = self.read_to_end(src)? {
            return Ok(Some(reason));
        }
        self.seal(src)?;
        Ok(None)
    }

    /// Pumps until the published end (under a barrier it stays put), so that the pin, and a
    /// snapshot taken through it, is exactly at the cursor; what is read stays in the open
    /// segment. A break in continuity is returned, not acted on.
    pub(super) fn read_to_end(&mut self, src: &mut Source) -> Result<Option<&'static str>> {
        loop {
            let pumped = src.pump(&mut self.sink());
            self.after_pump(&pumped)?;
            if let Pumped::Discontinuity { reason } = pumped? {
                return Ok(Some(reason));
            }
            if !src.behind() {
                return Ok(None);
            }
            self.seal_if_full(src)?;
        }
    }

    /// Where WAL events go: pages and commits into the open segment.
    pub(super) fn sink(
        &mut self,
    ) -> impl FnMut(WalEvent<'_>) -> std::result::Result<(), String> + '_ {
        move |event| self.take(event).map_err(|e| e.to_string())
    }

    pub(super) fn take(&mut self, event: WalEvent<'_>) -> std::io::Result<()> {
        if self.open.is_none() {
            let first = self.state.next_txid;
            let name = format!("segment-{first:016x}");
            let (file, path) = self.cache.scratch(&name).map_err(std::io::Error::other)?;
            let header = SegmentHeader {
                page_size: self.state.page_size,
                lineage: manifest::lineage(&self.state.generation),
                first_txid: first,
            };
            self.open = Some(Open {
                writer: SegmentWriter::new(file, header)?,
                path,
                first,
                first_unix_ns: 0,
                last_unix_ns: 0,
                opened: Instant::now(),
                in_txn: false,
            });
        }
        let open = self.open.as_mut().expect("opened above");
        match event {
            WalEvent::Page { pgno, data } => {
                open.in_txn = true;
                let offset = open.writer.page(pgno, data)?;
                if let Some(map) = &mut self.map {
                    map.page(pgno, offset);
                }
                Ok(())
            }
            WalEvent::Commit { db_pages, .. } => {
                let now = now_ns()
                    .max(self.state.last_commit_unix_ns)
                    .max(open.last_unix_ns);
                let info = open.writer.commit(now, db_pages)?;
                if let Some(map) = &mut self.map {
                    map.commit(db_pages);
                }
                if info.txid == open.first {
                    open.first_unix_ns = now;
                }
                open.last_unix_ns = now;
                open.in_txn = false;
                Ok(())
            }
        }
    }

    /// After a pump: a transaction left half written by a failed read is cut off.
    pub(super) fn after_pump(
        &mut self,
        pumped: &std::result::Result<Pumped, SourceError>,
    ) -> Result<()> {
        if pumped.is_err() || matches!(pumped, Ok(Pumped::Discontinuity { .. })) {
            self.discard_partial();
        }
        Ok(())
    }

    pub(super) fn discard_partial(&mut self) {
        if let Some(open) = &mut self.open
            && open.in_txn
        {
            if let Err(e) = open.writer.discard() {
                tracing::warn!(error = %e, "cannot cut a half-read transaction; dropping the segment");
                if open.writer.txns() > 0 {
                    self.broken = Some("a segment being written had to be dropped");
                }
                self.open = None;
                if let Some(map) = &mut self.map {
                    map.discard_segment();
                }
                return;
            }
            open.in_txn = false;
            if let Some(map) = &mut self.map {
                map.discard_txn();
            }
            if open.writer.txns() == 0 {
                let path = open.path.clone();
                self.open = None;
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Whether the open segment is old or big enough to be cut.
    pub(super) fn segment_due(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.opened.elapsed() >= self.cfg.batch || o.writer.len() >= MAX_SEGMENT)
    }

    /// Cuts the open segment once it reached [`MAX_SEGMENT`].
    pub(super) fn seal_if_full(&mut self, source: &Source) -> Result<()> {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.writer.len() >= MAX_SEGMENT)
        {
            self.seal(source)?;
        }
        Ok(())
    }

    /// Cuts the open segment into the outbox and moves the saved state past it.
    pub(super) fn seal(&mut self, source: &Source) -> Result<()> {
        if self.open.is_none() {
            // No transaction, but the WAL may have restarted: keep the saved position current
            // so that a restart resumes in the new lifetime instead of seeing a break.
            let cursor = source.cursor().map(Into::into);
            if cursor.is_some() && cursor != self.state.cursor {
                self.state.cursor = cursor;
                self.save()?;
            }
            return Ok(());
        }
        let finished = self.finish_open(source)?.expect("a segment is open");
        self.commit_finished(finished)
    }

    /// Ends the open segment's file (not yet in the outbox).
    fn finish_open(&mut self, source: &Source) -> Result<Option<Finished>> {
        let Some(open) = self.open.take() else {
            return Ok(None);
        };
        debug_assert!(!open.in_txn, "sealed with a transaction half read");
        let meta = TailMeta {
            generation: self.state.generation.clone(),
            first: open.first,
            last: open.writer.next_txid() - 1,
            first_unix_ns: open.first_unix_ns,
            last_unix_ns: open.last_unix_ns,
            cursor: source.cursor().map(Into::into),
        };
        open.writer
            .finish()
            .map_err(io("finish segment", &open.path))?;
        Ok(Some(Finished {
            path: open.path,
            meta,
        }))
    }

    /// Puts a finished segment into the outbox and moves the saved state past it. When that
    /// fails, its transactions are read (the cursor is past them) but in no item: the history
    /// is broken, and the next pump starts a new generation rather than number later
    /// transactions as if these never happened.
    pub(super) fn commit_finished(&mut self, f: Finished) -> Result<()> {
        let r = self.try_commit_finished(f);
        if r.is_err() {
            self.broken = Some("a segment could not be put into the outbox");
        }
        r
    }

    fn try_commit_finished(&mut self, f: Finished) -> Result<()> {
        let TailMeta {
            first,
            last,
            first_unix_ns,
            last_unix_ns,
            cursor,
            ..
        } = f.meta;
        let kind = ItemKind::Segment {
            first,
            last,
            first_unix_ns,
            last_unix_ns,
        };
        if let Some(map) = &mut self.map
            && let Err(e) = map.seal(first, last, &f.path)
        {
            tracing::warn!(error = %e, "page map dropped; the next break takes a full snapshot");
            self.map = None;
        }
        self.add(kind, &f.path)?;
        self.state.next_txid = last + 1;
        self.state.last_commit_unix_ns = last_unix_ns;
        self.state.cursor = cursor;
        self.save()?;
        Ok(())
    }

    /// Under a barrier: reads to the published end, then records what is unsealed in the tail
    /// journal rather than the outbox. The caller makes it durable ([`Journal::sync`]) before
    /// the WAL may restart and commits the returned segment once the barrier is released.
    /// Without a journal, or for a tail too big for it, the segment is sealed the usual way at
    /// once (`None`).
    pub(super) fn read_tail(
        &mut self,
        src: &mut Source,
    ) -> Result<(Option<&'static str>, Option<Finished>)> {
        if let Some(reason) = self.read_to_end(src)? {
            return Ok((Some(reason), None));
        }
        let Some(finished) = self.finish_open(src)? else {
            self.seal(src)?;
            return Ok((None, None));
        };
        let journalled = match &self.journal {
            Some(j) => j
                .record(&finished.meta, &finished.path)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "tail journal unusable; sealing under the barrier");
                    false
                }),
            None => false,
        };
        if journalled {
            Ok((None, Some(finished)))
        } else {
            self.commit_finished(finished)?;
            Ok((None, None))
        }
    }

    /// Copies the database as of the pin into the outbox as a snapshot after `txid`. A new
    /// generation's base is a delta on the previous generation when the page map knows what the
    /// store restores of it and less than half the pages changed; when nothing changed at all,
    /// nothing is stored and [`Stored::Unchanged`] tells the caller to go on with the old one.
    pub(super) fn snapshot(
        &mut self,
        source: &Source,
        txid: u64,
        committed_unix_ns: i64,
        new_generation: Option<NewGeneration>,
    ) -> Result<Stored> {
        let (file, path) = self.cache.scratch("snapshot.db")?;
        drop(file);
        std::fs::remove_file(&path).map_err(io("prepare", &path))?;
        source.snapshot_to(&path)?;
        let page_size = self.state.page_size;
        let hashes = pagemap::hash_file(&path, page_size).map_err(io("read", &path))?;
        let db_pages = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        let map = new_generation.as_ref().and_then(|_| self.map.take());
        if map
            .as_ref()
            .is_some_and(|m| m.hashes() == hashes.as_slice())
        {
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
            self.map = map;
            return Ok(Stored::Unchanged);
        }
        let delta = match map {
            Some(map) => self.delta(&map, &path, &hashes, committed_unix_ns)?,
            None => None,
        };
        let (data, parent) = match delta {
            Some((delta, parent)) => {
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
                (delta, Some(parent))
            }
            None => (path, None),
        };
        let root = Root {
            txid,
            delta: parent.is_some(),
        };
        if let Some(p) = &parent {
            tracing::info!(
                db = %self.cfg.db_path.display(),
                parent = %p.generation,
                "new generation based on the pages that changed since transaction {}",
                p.txid
            );
        }
        let kind = ItemKind::Snapshot {
            txid,
            committed_unix_ns,
            db_pages,
            new_generation,
            parent,
        };
        self.add(kind, &data)?;
        self.state.last_snapshot_unix_ms = now_ms();
        self.state.cursor = source.cursor().map(Into::into);
        self.save()?;
        let dir = self.cache.dir().to_path_buf();
        let generation = self.state.generation.clone();
        self.map = PageMap::create(&dir, &generation, root, txid, page_size, hashes)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot keep a page map"))
            .ok();
        Ok(Stored::Snapshot)
    }

    /// Writes the pages of `snapshot` that differ from what `map` says a restore of the
    /// previous generation builds, as a one-transaction segment of the new generation.
    /// `None` when the map cannot serve (another delta underneath, a different page size, not
    /// at the saved transaction) or half the pages or more changed.
    pub(super) fn delta(
        &self,
        map: &PageMap,
        snapshot: &Path,
        hashes: &[PageHash],
        committed_unix_ns: i64,
    ) -> Result<Option<(PathBuf, Parent)>> {
        let page_size = self.state.page_size;
        if map.root().delta || map.page_size() != page_size {
            return Ok(None);
        }
        let changed = map.changed(hashes);
        if changed.len() * 2 >= hashes.len() {
            return Ok(None);
        }
        let (file, path) = self.cache.scratch("delta")?;
        let header = SegmentHeader {
            page_size,
            lineage: manifest::lineage(&self.state.generation),
            first_txid: 0,
        };
        let db_pages = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        let src = std::fs::File::open(snapshot).map_err(io("open", snapshot))?;
        let mut page = vec![0u8; page_size as usize];
        let mut w = SegmentWriter::new(file, header).map_err(io("write", &path))?;
        for pgno in changed {
            std::os::unix::fs::FileExt::read_exact_at(
                &src,
                &mut page,
                u64::from(pgno - 1) * u64::from(page_size),
            )
            .map_err(io("read", snapshot))?;
            w.page(pgno, &page).map_err(io("write", &path))?;
        }
        w.commit(committed_unix_ns, db_pages)
            .map_err(io("write", &path))?;
        w.finish().map_err(io("finish", &path))?;
        Ok(Some((
            path,
            Parent {
                generation: map.generation().to_string(),
                txid: map.txid(),
                snapshot: map.root().txid,
            },
        )))
    }

    pub(super) fn add(&mut self, kind: ItemKind, path: &Path) -> Result<Item> {
        let number = self.state.next_item;
        let generation = self.state.generation.clone();
        // Segments are on the write path of every transaction: zstd's fastest regular level
        // keeps up with a saturating writer where level 3 did not (integration/bench/sqlite.sh).
        let level = match kind {
            ItemKind::Segment { .. } => self.cfg.compression_level.min(SEGMENT_LEVEL),
            ItemKind::Snapshot { .. } => self.cfg.compression_level,
        };
        let item = self
            .cache
            .add_item(number, &generation, kind, path, level)?;
        self.state.next_item = number + 1;
        Ok(item)
    }

    /// Saves the state; only then may the items it counts be shipped (an item cut after the
    /// last save is dropped at the next start, so it must never reach the store first).
    pub(super) fn save(&mut self) -> Result<()> {
        self.cache.save_state(&self.state)?;
        let mut st = self.shared.status.lock().expect("status lock");
        st.shippable_below = self.state.next_item;
        st.last_item = self.state.next_item.checked_sub(1);
        drop(st);
        self.shared.outbox.notify_one();
        Ok(())
    }

    /// Copies where reading stands into the shared status.
    pub(super) fn publish(&self) {
        let mut st = self.shared.status.lock().expect("status lock");
        st.generation.clone_from(&self.state.generation);
        st.next_txid = self.state.next_txid;
        st.last_commit_unix_ns = self.state.last_commit_unix_ns;
        st.oldest_unsealed_unix_ns = self
            .open
            .as_ref()
            .filter(|o| o.writer.txns() > 0)
            .map(|o| o.first_unix_ns);
        st.wal_frames = self.state.cursor.map_or(0, |c| c.next_frame - 1);
    }

    /// Records the outcome of a step for status (errors are logged once per change).
    pub(super) fn note(&self, error: Option<String>) {
        let mut st = self.shared.status.lock().expect("status lock");
        if error.is_some() && st.last_error != error {
            tracing::warn!(db = %self.cfg.db_path.display(), error = error.as_deref().unwrap_or(""), "replication step failed; retrying");
        }
        st.last_error = error;
    }
}
