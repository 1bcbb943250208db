//! A micro-batch's data (sensor windows, action chunks, VL inputs) and its preparation ahead of
//! time on a worker thread ([`Prefetcher`], `data.prefetch`).

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::dataset::reader::{Array, Dataset};
use crate::train::error::TrainError;
use crate::vlm::{VlBatch, VlProcessor};

type Result<T> = std::result::Result<T, TrainError>;

/// Which VL inputs a micro-batch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum VlNeed {
    /// None (a cached features epoch).
    None,
    /// Token ids and positions from the frame sizes (the image embeddings come from the cache).
    Text,
    /// Decoded and processed images (no cache).
    Images,
}

/// A micro-batch's data: sensor windows, action chunks and the VL inputs it needs.
pub(super) struct MicroBatchData {
    pub(super) sensor: Array<f32>,
    pub(super) action: Array<f32>,
    pub(super) vl: Option<VlBatch>,
}

/// Reads and builds the data of `idx` (dataset indices); runs on the data worker or inline.
fn prepare(ds: &Dataset, processor: &VlProcessor, idx: &[usize], need: VlNeed) -> Result<MicroBatchData> {
    let (sensor, action) = ds.sensor_action(idx)?;
    Ok(MicroBatchData { sensor, action, vl: vl_batch_of(ds, processor, idx, need)? })
}

/// The VL batch of `idx` that `need` asks for (None for [`VlNeed::None`]).
pub(super) fn vl_batch_of(
    ds: &Dataset,
    processor: &VlProcessor,
    idx: &[usize],
    need: VlNeed,
) -> Result<Option<VlBatch>> {
    let samples = match need {
        VlNeed::None => return Ok(None),
        VlNeed::Text => {
            let sizes = frame_sizes(ds);
            idx.iter()
                .map(|&i| processor.text_sample(&sizes, instruction(ds, i)))
                .collect::<std::result::Result<Vec<_>, _>>()?
        }
        VlNeed::Images => idx
            .iter()
            .map(|&i| {
                ds.sample(i).map_err(TrainError::from).and_then(|s| Ok(processor.sample(&s.images, &s.instruction)?))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    Ok(Some(processor.collate(&samples)?))
}

/// The (width, height) of every camera's frames, in camera order.
pub(super) fn frame_sizes(ds: &Dataset) -> Vec<(u32, u32)> {
    ds.index.cameras.iter().map(|c| (c.width, c.height)).collect()
}

/// The instruction of sample `i`'s episode.
pub(super) fn instruction(ds: &Dataset, i: usize) -> &str {
    &ds.index.episodes[ds.index.samples[i].episode].instruction
}

/// Prepares the next micro-batch's data on a worker thread while the current one computes.
pub(super) struct Prefetcher {
    /// `data.prefetch`.
    enabled: bool,
    /// The micro-batch the loop will ask for next ([`crate::train::runner::TrainTask::prefetch`]).
    next: Option<Vec<usize>>,
    /// Its data, being prepared on a worker thread.
    pending: Option<(Vec<usize>, VlNeed, JoinHandle<Result<MicroBatchData>>)>,
    /// Micro-batches whose data came from the worker.
    pub(super) hits: u64,
}

impl Prefetcher {
    /// A prefetcher that works only when `enabled`.
    pub(super) fn new(enabled: bool) -> Self {
        Self { enabled, next: None, pending: None, hits: 0 }
    }

    /// Announces the micro-batch (dataset indices) the loop will ask for next.
    pub(super) fn announce(&mut self, next: impl Iterator<Item = usize>) {
        if self.enabled {
            self.next = Some(next.collect());
        }
    }

    /// The data of micro-batch `idx`: what the worker prepared for it, or prepared now; then the
    /// worker starts on the next micro-batch the loop announced (outside cached epochs).
    pub(super) fn data(
        &mut self,
        ds: &Arc<Dataset>,
        processor: &Arc<VlProcessor>,
        idx: &[usize],
        need: VlNeed,
    ) -> Result<MicroBatchData> {
        let data = match self.pending.take() {
            Some((for_idx, for_need, worker)) if for_idx == idx && for_need == need => {
                self.hits += 1;
                worker
                    .join()
                    .map_err(|_| TrainError::invalid("data worker", "panicked while preparing a micro-batch"))??
            }
            // Another micro-batch (e.g. the micro-batch was halved): prepared here.
            _ => prepare(ds, processor, idx, need)?,
        };
        // A cached epoch's data (two small reads) costs less than a thread: no worker then.
        if let Some(next) = self.next.take().filter(|_| need != VlNeed::None) {
            let (ds, processor, for_idx) = (Arc::clone(ds), Arc::clone(processor), next.clone());
            let worker = std::thread::Builder::new()
                .name("stage2-data".into())
                .spawn(move || prepare(&ds, &processor, &for_idx, need))
                .map_err(|e| TrainError::invalid("data worker", format!("could not start: {e}")))?;
            self.pending = Some((next, need, worker));
        }
        Ok(data)
    }
}
