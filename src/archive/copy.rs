//! Overlay-exact copy of an upper dir through an in-process tar stream (no compression, no file).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::error::{ArchiveError, Result};
use super::extract::check_target;
use super::pack::write_tree;
use super::tarout::TarOut;
use super::unpack::{SourceReader, extract_into_target};
use super::{UnpackOptions, UnpackStats};

struct ChanWriter(SyncSender<Vec<u8>>);

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ChanReader {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                // Producer finished (or died): end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

pub fn copy_tree(src: &Path, target: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    let slot = check_target(target)?;
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Vec<u8>>(4);
        let producer = s.spawn(move || -> Result<()> {
            let mut out = TarOut::new(ChanWriter(tx), src, false, None)?;
            write_tree(src, &mut out)?;
            out.finish().map(|_| ())
        });
        let reader = SourceReader::new(
            ChanReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
            opts.max_uncompressed,
            None,
            None,
        );
        let result = extract_into_target(&slot, reader, src, opts);
        let produced = producer
            .join()
            .map_err(|_| ArchiveError::ProducerPanicked {
                src: src.to_owned(),
            })?;
        match (result, produced) {
            // A producer failure shows up downstream as a cut stream; report the cause.
            (Err(ArchiveError::Truncated { .. }), Err(pe)) => Err(pe),
            (result, _) => result,
        }
    })
}
