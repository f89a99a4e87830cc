//! Progress bars for sync and restore, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use zlayer_storage::layer::{LayerProgress, Phase, ProgressEvent};

/// A bar that follows the phases of one sync or restore.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
    phase: Mutex<Option<Phase>>,
}

impl Bar {
    /// A callback for the layer manager, or `None` when stderr is not a terminal.
    pub fn for_terminal() -> Option<(Arc<Bar>, LayerProgress)> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = Arc::new(Bar {
            bar: ProgressBar::no_length(),
            phase: Mutex::new(None),
        });
        let cb = Arc::clone(&bar);
        let progress: LayerProgress = Arc::new(move |ev: ProgressEvent| cb.update(ev));
        Some((bar, progress))
    }

    fn update(&self, ev: ProgressEvent) {
        let Ok(mut phase) = self.phase.lock() else {
            return;
        };
        if *phase != Some(ev.phase) {
            *phase = Some(ev.phase);
            let template = if ev.total.is_some() {
                "{msg:>9} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
            } else {
                "{msg:>9} {spinner} {bytes} {bytes_per_sec}"
            };
            self.bar.set_message(ev.phase.label());
            match ev.total {
                Some(t) => self.bar.set_length(t),
                None => self.bar.unset_length(),
            }
            if let Ok(style) = ProgressStyle::with_template(template) {
                self.bar.set_style(style.progress_chars("=> "));
            }
            self.bar.reset();
        }
        self.bar.set_position(ev.done);
    }

    /// Removes the bar before the summary line is printed.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
