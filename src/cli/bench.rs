//! `vla_finetune bench`: Stage 2 step (per cache mode), vision-cache build and `act()` latency
//! of our implementation, each case in a fresh child process of this binary (honest peaks),
//! printed as a table and optionally written as JSON records (the schema
//! scripts/reference_bench.py writes too). Recording throughput is not measured here (see
//! tests/isolated/recorder_bench.rs and docs/benchmarks.md).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::bench::run::{run_case, Inputs};
use crate::bench::{table, BenchPrecision, CaseKind, CaseSpec, ModelSize, Record, StepCache};

/// Arguments of `bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Backbone shapes (random weights unless --model-dir).
    #[arg(long, value_enum, default_value = "reduced")]
    pub model: ModelSize,
    /// Load this Hugging Face model directory instead of random weights.
    #[arg(long)]
    pub model_dir: Option<String>,
    /// Camera views per sample.
    #[arg(long, default_value_t = 2)]
    pub views: usize,
    /// Side of the square synthetic frames (default: 56 tiny, 224 reduced, 448 full).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Samples per step.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// LoRA rank (alpha = 2 r).
    #[arg(long, default_value_t = 8)]
    pub rank: i64,
    /// Which measurements.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "step,vision-cache,act")]
    pub kinds: Vec<CaseKind>,
    /// Cache modes of the step.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off,vision,features")]
    pub cache: Vec<StepCache>,
    /// Gradient checkpointing of every decoder layer in the step.
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub checkpointing: bool,
    /// Compute precision.
    #[arg(long, value_enum, default_value = "bf16")]
    pub precision: BenchPrecision,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Timed iterations per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// DDIM steps of act().
    #[arg(long, default_value_t = 10)]
    pub ddim_steps: usize,
    /// Write the records to this JSON file (an array).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write the inputs of these shapes for scripts/reference_bench.py to this folder
    /// (config.json, heads.json, inputs.safetensors).
    #[arg(long)]
    pub export: Option<PathBuf>,
    /// Run every case in this process (peaks then accumulate across cases).
    #[arg(long)]
    pub in_process: bool,
    /// Internal: run the one case given as JSON and print its record as JSON.
    #[arg(long, hide = true)]
    pub case: Option<String>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("`{other}`: expected on or off")),
    }
}

impl BenchArgs {
    /// The cases these arguments ask for, in order.
    pub fn cases(&self) -> Vec<CaseSpec> {
        let base = CaseSpec {
            kind: CaseKind::Step,
            model: self.model,
            model_dir: self.model_dir.clone(),
            views: self.views,
            image_size: self.image_size.unwrap_or(self.model.default_image_size()),
            batch: self.batch,
            lora_rank: self.rank,
            cache: None,
            checkpointing: self.checkpointing,
            precision: self.precision,
            device: self.device.clone(),
            steps: self.steps,
            warmup: self.warmup,
            ddim_steps: self.ddim_steps,
        };
        let mut out = Vec::new();
        for &kind in &self.kinds {
            match kind {
                CaseKind::Step => out.extend(self.cache.iter().map(|&c| CaseSpec { cache: Some(c), ..base.clone() })),
                _ => out.push(CaseSpec { kind, checkpointing: false, ..base.clone() }),
            }
        }
        out
    }
}

/// Runs `spec` in a fresh process of this binary and parses the record it prints.
fn run_in_child(spec: &CaseSpec) -> Result<Record> {
    let exe = std::env::current_exe().context("locating the vla_finetune binary")?;
    let out = Command::new(exe)
        .args(["bench", "--case", &serde_json::to_string(spec)?])
        .stderr(Stdio::inherit())
        .output()
        .context("starting the benchmark child process")?;
    if !out.status.success() {
        bail!("benchmark case {} {:?} failed ({})", spec.kind.as_str(), spec.cache.map(|c| c.as_str()), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("benchmark child printed no record"))?;
    serde_json::from_str(line).context("parsing the benchmark child's record")
}

/// Runs the command.
pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(case) = &args.case {
        let spec: CaseSpec = serde_json::from_str(case).context("--case: not a case JSON")?;
        println!("{}", serde_json::to_string(&run_case(&spec)?)?);
        return Ok(());
    }
    let cases = args.cases();
    if cases.is_empty() {
        bail!("bench: no case selected (--kinds / --cache are empty)");
    }
    if let Some(dir) = &args.export {
        Inputs::new(&cases[0])?.export(&cases[0], dir)?;
        eprintln!("reference inputs written to {}", dir.display());
    }
    let mut records = Vec::new();
    for spec in &cases {
        eprintln!("bench: {} {}", spec.kind.as_str(), spec.cache.map_or("", |c| c.as_str()));
        records.push(if args.in_process { run_case(spec)? } else { run_in_child(spec)? });
    }
    print!("{}", table::render(&records));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&records)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
