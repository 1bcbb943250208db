//! Plain-text table of benchmark records.

use super::case::Record;

const MIB: f64 = 1048576.0;

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_string(), |b| format!("{:.0}", b as f64 / MIB))
}

/// One line per record under a header: implementation, case, shapes, throughput, median step
/// time and peaks (MiB; `-` where not measured).
pub fn render(records: &[Record]) -> String {
    let mut out = format!(
        "{:<9} {:<12} {:<16} {:<4} {:<4} {:>5} {:>5} {:>5} {:>6} {:>12} {:<9} {:>10} {:>10} {:>9}\n",
        "impl",
        "kind",
        "cache",
        "ckpt",
        "prec",
        "batch",
        "views",
        "image",
        "tokens",
        "throughput",
        "unit",
        "step_ms",
        "accel_MiB",
        "host_MiB"
    );
    for r in records {
        let s = &r.spec;
        out.push_str(&format!(
            "{:<9} {:<12} {:<16} {:<4} {:<4} {:>5} {:>5} {:>5} {:>6} {:>12.3} {:<9} {:>10.1} {:>10} {:>9}\n",
            r.implementation,
            s.kind.as_str(),
            s.cache.map_or("-", |c| c.as_str()),
            if s.checkpointing { "on" } else { "off" },
            match s.precision {
                super::case::BenchPrecision::F32 => "f32",
                super::case::BenchPrecision::Bf16 => "bf16",
            },
            s.batch,
            s.views,
            s.image_size,
            r.tokens_per_sample,
            r.samples_per_s,
            r.unit,
            r.step_ms,
            mib(r.peak_accel_bytes),
            mib(r.peak_host_bytes),
        ));
    }
    out
}
