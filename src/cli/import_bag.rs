//! `vla_finetune import-bag BAG --streams FILE --out DATASET`: a rosbag2 bag becomes an episode.

use std::path::PathBuf;

use anyhow::Context;

use crate::dataset::import::{import_bag, ImportOptions};
use crate::dataset::streams::StreamConfig;

/// Arguments of `import-bag`.
#[derive(clap::Args, Debug)]
pub struct ImportBagArgs {
    /// The rosbag2 folder (with metadata.yaml).
    pub bag: PathBuf,
    /// Stream mapping YAML.
    #[arg(long)]
    pub streams: PathBuf,
    /// Dataset root.
    #[arg(long)]
    pub out: PathBuf,
    /// Episode id (default: the bag folder's name).
    #[arg(long)]
    pub id: Option<String>,
    /// Language instruction.
    #[arg(long, default_value = "")]
    pub instruction: String,
    /// Task name.
    #[arg(long, default_value = "")]
    pub task: String,
    /// Operator.
    #[arg(long, default_value = "")]
    pub operator: String,
    /// Outcome: success, failure or aborted.
    #[arg(long, default_value = "success", value_parser = ["success", "failure", "aborted"])]
    pub outcome: String,
}

/// Runs `import-bag`.
pub fn run(a: ImportBagArgs) -> anyhow::Result<()> {
    let streams = StreamConfig::load(&a.streams)?;
    let opts = ImportOptions {
        id: a.id,
        instruction: a.instruction,
        task: a.task,
        operator: a.operator,
        outcome: a.outcome,
        ..Default::default()
    };
    let r = import_bag(&a.bag, &streams, &a.out, &opts).with_context(|| format!("importing {}", a.bag.display()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "episode": r.meta.id, "dir": r.dir, "imported": r.imported, "skipped": r.skipped, "unmapped": r.unmapped,
            "removed_leftover": r.removed_leftover,
        }))?
    );
    Ok(())
}
