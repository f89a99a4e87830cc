//! Overlay-exact copy of an upper dir through an in-process tar stream (no compression, no file).

use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};

use super::decode::ChannelReader;
use super::error::{ArchiveError, Result};
use super::pack::write_tree;
use super::target::check_target;
use super::tarout::TarOut;
use super::unpack::{SourceReader, extract_into_target};
use super::{UnpackOptions, UnpackStats};

/// The tar writer's end of the channel; reuses the chunks the reader hands back.
struct ChanWriter {
    tx: SyncSender<io::Result<Vec<u8>>>,
    spare: Receiver<Vec<u8>>,
}

impl Write for ChanWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut chunk = self.spare.try_recv().unwrap_or_default();
        chunk.clear();
        chunk.extend_from_slice(buf);
        self.tx
            .send(Ok(chunk))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn copy_tree(src: &Path, target: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    let slot = check_target(target)?;
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel(4);
        let (spare_tx, spare_rx) = mpsc::channel();
        let producer = s.spawn(move || -> Result<()> {
            let mut out = TarOut::new(
                ChanWriter {
                    tx,
                    spare: spare_rx,
                },
                src,
                false,
                None,
            )?;
            write_tree(src, &mut out, None, false)?;
            out.finish().map(|_| ())
        });
        let reader = SourceReader::new(
            ChannelReader::new(rx, spare_tx),
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
