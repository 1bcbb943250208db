//! A damage-tolerant scan of an MCAP file: every message of every readable chunk, in file order.

use std::collections::HashMap;

use super::*;
use mcap::records::{MessageHeader, Record};

/// One message found while scanning an MCAP file.
#[derive(Debug)]
pub struct ScannedMessage<'a> {
    /// Channel id.
    pub channel: u16,
    /// Log (receive) time, ns.
    pub log_time: u64,
    /// Publish time, ns.
    pub publish_time: u64,
    /// CDR bytes.
    pub data: std::borrow::Cow<'a, [u8]>,
    /// Index of the chunk holding it, `None` for a message outside chunks.
    pub chunk: Option<usize>,
    /// Position among the messages of its chunk.
    pub ordinal: usize,
}

impl<'a> ScannedMessage<'a> {
    fn new(header: &MessageHeader, data: std::borrow::Cow<'a, [u8]>, chunk: Option<usize>, ordinal: usize) -> Self {
        Self {
            channel: header.channel_id,
            log_time: header.log_time,
            publish_time: header.publish_time,
            data,
            chunk,
            ordinal,
        }
    }
}

/// A channel and its schema name, found while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedChannel {
    /// Topic.
    pub topic: String,
    /// Schema (type) name.
    pub type_name: String,
    /// Message encoding.
    pub encoding: String,
}

/// How a scan ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanEnd {
    /// True when the data section ended properly (a DataEnd or Footer record was reached).
    pub complete: bool,
    /// Why the scan stopped early (truncation, bad CRC...), when it did.
    pub stopped: Option<String>,
    /// Chunks read successfully.
    pub chunks: usize,
    /// Byte offset (in the file) of each good chunk record.
    pub chunk_offsets: Vec<usize>,
    /// Records skipped as damaged (bad CRC, bad compression, unparsable) while their framing
    /// held, so the scan went on past them: why, per record.
    pub lost: Vec<String>,
    /// Bytes of those skipped records.
    pub lost_bytes: usize,
    /// Byte offset where the scan ended (the data-end record, or where the file stopped making sense).
    pub end_offset: usize,
}

/// Reads an MCAP data section record by record, handing every message of every valid chunk to
/// `on_message` in file order. A record that fails to parse or decompress (bad CRC) while its
/// length still fits the file is skipped and listed in [`ScanEnd::lost`]; the scan stops at the
/// first truncated record (what a crash leaves) instead of failing: everything before it is
/// delivered.
pub fn scan_mcap<'a>(
    buf: &'a [u8],
    channels: &mut HashMap<u16, ScannedChannel>,
    mut on_message: impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'a>),
) -> ScanEnd {
    let mut end = ScanEnd::default();
    if buf.len() < 8 || &buf[..8] != MCAP_MAGIC {
        end.stopped = Some("not an MCAP file (bad magic)".into());
        return end;
    }
    let mut schemas: HashMap<u16, String> = HashMap::new();
    top_level_channels(buf, &mut schemas, channels);
    let mut pos = 8usize;
    let mut loose = 0usize;
    loop {
        end.end_offset = pos;
        if pos == buf.len() {
            end.stopped = Some(format!("file ends at byte {pos} without a data-end record"));
            return end;
        }
        if buf.len() - pos < 9 {
            end.stopped = Some(format!("truncated record header at byte {pos}"));
            return end;
        }
        let op = buf[pos];
        let len = u64::from_le_bytes(buf[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (buf.len() - pos - 9) as u64 {
            end.stopped = Some(format!(
                "record at byte {pos} (op 0x{op:02x}) is truncated: {len} bytes announced, {} present",
                buf.len() - pos - 9
            ));
            return end;
        }
        let body = &buf[pos + 9..pos + 9 + len as usize];
        let record = match mcap::read::parse_record(op, body) {
            Ok(r) => r,
            Err(e) => {
                end.lost.push(format!("record at byte {pos} (op 0x{op:02x}) does not parse: {e}"));
                end.lost_bytes += 9 + body.len();
                pos += 9 + body.len();
                continue;
            }
        };
        match record {
            Record::Chunk { header, data } => {
                // Decode the whole chunk first so a damaged chunk contributes nothing.
                let inner = match decode_chunk(&header, &data) {
                    Ok(records) => records,
                    Err(e) => {
                        end.lost.push(format!("chunk at byte {pos} is damaged: {e}"));
                        end.lost_bytes += 9 + body.len();
                        pos += 9 + body.len();
                        continue;
                    }
                };
                let chunk = end.chunks;
                let mut ordinal = 0;
                for r in inner {
                    match r {
                        Record::Schema { header, .. } => {
                            schemas.insert(header.id, header.name);
                        }
                        Record::Channel(c) => {
                            let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
                            channels.insert(
                                c.id,
                                ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding },
                            );
                        }
                        Record::Message { header, data } => {
                            let data = std::borrow::Cow::Owned(data.into_owned());
                            on_message(channels, ScannedMessage::new(&header, data, Some(chunk), ordinal));
                            ordinal += 1;
                        }
                        _ => {}
                    }
                }
                end.chunks += 1;
                end.chunk_offsets.push(pos);
            }
            Record::Schema { header, .. } => {
                schemas.insert(header.id, header.name);
            }
            Record::Channel(c) => {
                let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
                channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
            }
            Record::Message { header, data } => {
                on_message(channels, ScannedMessage::new(&header, data, None, loose));
                loose += 1;
            }
            Record::DataEnd(_) | Record::Footer(_) => {
                end.complete = true;
                return end;
            }
            _ => {}
        }
        pos += 9 + len as usize;
    }
}

/// Largest uncompressed chunk accepted (the recorder closes chunks at a few MiB).
const MAX_CHUNK_BYTES: u64 = 1 << 30;

/// Decompresses a chunk, checks its size and CRC, then parses its records, every length checked
/// against what is there. Done here rather than by the mcap crate's chunk reader, which trusts
/// lengths read from not yet CRC-checked data and panics ("capacity overflow") on a damaged one.
pub(super) fn decode_chunk(header: &mcap::records::ChunkHeader, data: &[u8]) -> Result<Vec<Record<'static>>, String> {
    let size = header.uncompressed_size;
    if size > MAX_CHUNK_BYTES {
        return Err(format!("announces {size} uncompressed bytes; expected at most {MAX_CHUNK_BYTES}"));
    }
    let raw = match header.compression.as_str() {
        "" => data.to_vec(),
        "zstd" => zstd::bulk::decompress(data, size as usize).map_err(|e| format!("zstd: {e}"))?,
        "lz4" => {
            let mut out = Vec::new();
            let dec = lz4::Decoder::new(data).map_err(|e| format!("lz4: {e}"))?;
            std::io::Read::read_to_end(&mut std::io::Read::take(dec, size + 1), &mut out)
                .map_err(|e| format!("lz4: {e}"))?;
            out
        }
        other => return Err(format!("compression `{other}`; expected zstd, lz4 or none")),
    };
    if raw.len() as u64 != size {
        return Err(format!("decompresses to {} bytes; the header says {size}", raw.len()));
    }
    let crc = crc32fast::hash(&raw);
    if header.uncompressed_crc != 0 && crc != header.uncompressed_crc {
        return Err(format!("CRC {crc:08x} of the content; the header says {:08x}", header.uncompressed_crc));
    }
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos < raw.len() {
        if raw.len() - pos < 9 {
            return Err(format!("truncated record header at byte {pos} of the content"));
        }
        let len = u64::from_le_bytes(raw[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (raw.len() - pos - 9) as u64 {
            return Err(format!(
                "record at byte {pos} of the content announces {len} bytes, {} present",
                raw.len() - pos - 9
            ));
        }
        let body = &raw[pos + 9..pos + 9 + len as usize];
        records.push(
            mcap::read::parse_record(raw[pos], body)
                .map_err(|e| format!("record at byte {pos} of the content: {e}"))?
                .into_owned(),
        );
        pos += 9 + len as usize;
    }
    Ok(records)
}

/// Reads the schema and channel records outside chunks (a finished file repeats them in its
/// summary), so the messages of later chunks stay readable when the chunk that first declared
/// their channel is damaged. Walks the record framing only; stops where it breaks.
fn top_level_channels(buf: &[u8], schemas: &mut HashMap<u16, String>, channels: &mut HashMap<u16, ScannedChannel>) {
    let mut pos = 8usize;
    let mut found = Vec::new();
    while buf.len().saturating_sub(pos) >= 9 {
        let len = u64::from_le_bytes(buf[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > (buf.len() - pos - 9) as u64 {
            break;
        }
        let (op, body) = (buf[pos], &buf[pos + 9..pos + 9 + len as usize]);
        if op == 0x03 || op == 0x04 {
            if let Ok(r) = mcap::read::parse_record(op, body) {
                found.push(r);
            }
        }
        pos += 9 + len as usize;
    }
    for r in &found {
        if let Record::Schema { header, .. } = r {
            schemas.insert(header.id, header.name.clone());
        }
    }
    for r in found {
        if let Record::Channel(c) = r {
            let type_name = schemas.get(&c.schema_id).cloned().unwrap_or_default();
            channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
        }
    }
}
