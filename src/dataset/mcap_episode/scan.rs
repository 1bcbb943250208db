//! A damage-tolerant scan of an MCAP file: every message of every readable chunk, in file order.

use std::borrow::Cow;
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
    pub data: Cow<'a, [u8]>,
    /// Index of the chunk holding it, `None` for a message outside chunks.
    pub chunk: Option<usize>,
    /// Position among the messages of its chunk.
    pub ordinal: usize,
}

impl<'a> ScannedMessage<'a> {
    fn new(header: &MessageHeader, data: Cow<'a, [u8]>, chunk: Option<usize>, ordinal: usize) -> Self {
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
    on_message: impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'a>),
) -> ScanEnd {
    scan(&buf, channels, on_message)
}

/// [`scan_mcap`] on a file read one record at a time (a chunk at most in memory), for files
/// too large to hold: a read error ends the scan like a truncation, in [`ScanEnd::stopped`].
pub fn scan_mcap_file(
    file: &std::fs::File,
    channels: &mut HashMap<u16, ScannedChannel>,
    on_message: impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'static>),
) -> std::io::Result<ScanEnd> {
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    Ok(scan(&FileBytes { file, len }, channels, on_message))
}

/// The bytes a scan reads: a slice (messages outside chunks borrow it) or a file.
trait Source<'a> {
    fn len(&self) -> usize;
    /// `n` bytes at `pos`, which the caller has checked lie within `len()`.
    fn read(&self, pos: usize, n: usize) -> Result<Cow<'a, [u8]>, String>;
}

impl<'a> Source<'a> for &'a [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn read(&self, pos: usize, n: usize) -> Result<Cow<'a, [u8]>, String> {
        Ok(Cow::Borrowed(&self[pos..pos + n]))
    }
}

/// A file read with positioned reads.
struct FileBytes<'f> {
    file: &'f std::fs::File,
    len: usize,
}

impl Source<'static> for FileBytes<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, pos: usize, n: usize) -> Result<Cow<'static, [u8]>, String> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; n];
        self.file.read_exact_at(&mut buf, pos as u64).map_err(|e| format!("reading {n} bytes at byte {pos}: {e}"))?;
        Ok(Cow::Owned(buf))
    }
}

/// [`scan_mcap`] over either source.
fn scan<'a>(
    src: &impl Source<'a>,
    channels: &mut HashMap<u16, ScannedChannel>,
    mut on_message: impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'a>),
) -> ScanEnd {
    let mut end = ScanEnd::default();
    if src.len() < 8 || src.read(0, 8).map_or(true, |m| *m != *MCAP_MAGIC) {
        end.stopped = Some("not an MCAP file (bad magic)".into());
        return end;
    }
    let mut declared = Declared { schemas: HashMap::new(), channels };
    top_level_channels(src, &mut declared);
    let mut pos = 8usize;
    let mut loose = 0usize;
    loop {
        end.end_offset = pos;
        let (op, body) = match record_at(src, pos) {
            Ok(r) => r,
            Err(why) => {
                end.stopped = Some(why);
                return end;
            }
        };
        let body_len = body.len();
        match parse(op, body) {
            Err(e) => end.skip(format!("record at byte {pos} (op 0x{op:02x}) does not parse: {e}"), body_len),
            // Decode the whole chunk first so a damaged chunk contributes nothing.
            Ok(Record::Chunk { header, data }) => match decode_chunk(&header, &data) {
                Ok(records) => {
                    declared.chunk(records, end.chunks, &mut on_message);
                    end.chunks += 1;
                    end.chunk_offsets.push(pos);
                }
                Err(e) => end.skip(format!("chunk at byte {pos} is damaged: {e}"), body_len),
            },
            Ok(Record::Message { header, data }) => {
                on_message(declared.channels, ScannedMessage::new(&header, data, None, loose));
                loose += 1;
            }
            Ok(Record::DataEnd(_) | Record::Footer(_)) => {
                end.complete = true;
                return end;
            }
            Ok(other) => declared.declare(other),
        }
        pos += 9 + body_len;
    }
}

/// Parses a record body; one read from a slice keeps borrowing it, one read from a file owns its
/// bytes.
fn parse<'a>(op: u8, body: Cow<'a, [u8]>) -> mcap::McapResult<Record<'a>> {
    match body {
        Cow::Borrowed(b) => mcap::read::parse_record(op, b),
        Cow::Owned(v) => mcap::read::parse_record(op, &v).map(Record::into_owned),
    }
}

impl ScanEnd {
    /// Lists a damaged record whose framing held (`body_len` bytes after its 9-byte header).
    fn skip(&mut self, why: String, body_len: usize) {
        self.lost.push(why);
        self.lost_bytes += 9 + body_len;
    }
}

/// The record at byte `pos` of `src`: its opcode and body, or why the data section stops there.
fn record_at<'a>(src: &impl Source<'a>, pos: usize) -> Result<(u8, Cow<'a, [u8]>), String> {
    let (op, len) = header_at(src, pos)?;
    if len > (src.len() - pos - 9) as u64 {
        return Err(format!(
            "record at byte {pos} (op 0x{op:02x}) is truncated: {len} bytes announced, {} present",
            src.len() - pos - 9
        ));
    }
    Ok((op, src.read(pos + 9, len as usize)?))
}

/// The opcode and announced length of the record at byte `pos` of `src`.
fn header_at<'a>(src: &impl Source<'a>, pos: usize) -> Result<(u8, u64), String> {
    if pos == src.len() {
        return Err(format!("file ends at byte {pos} without a data-end record"));
    }
    if src.len() - pos < 9 {
        return Err(format!("truncated record header at byte {pos}"));
    }
    let h = src.read(pos, 9)?;
    Ok((h[0], u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"))))
}

/// The schema names and channels declared so far in a scan.
struct Declared<'c> {
    /// Schema id -> schema (type) name.
    schemas: HashMap<u16, String>,
    channels: &'c mut HashMap<u16, ScannedChannel>,
}

impl Declared<'_> {
    /// Takes in a schema or channel record; other records are ignored.
    fn declare(&mut self, record: Record<'_>) {
        match record {
            Record::Schema { header, .. } => {
                self.schemas.insert(header.id, header.name);
            }
            Record::Channel(c) => {
                let type_name = self.schemas.get(&c.schema_id).cloned().unwrap_or_default();
                self.channels.insert(c.id, ScannedChannel { topic: c.topic, type_name, encoding: c.message_encoding });
            }
            _ => {}
        }
    }

    /// Hands the messages of good chunk number `chunk` (its decoded `records`) to `on_message`,
    /// taking in its schemas and channels on the way.
    fn chunk<'a>(
        &mut self,
        records: Vec<Record<'static>>,
        chunk: usize,
        on_message: &mut impl FnMut(&HashMap<u16, ScannedChannel>, ScannedMessage<'a>),
    ) {
        let mut ordinal = 0;
        for r in records {
            match r {
                Record::Message { header, data } => {
                    let data = std::borrow::Cow::Owned(data.into_owned());
                    on_message(self.channels, ScannedMessage::new(&header, data, Some(chunk), ordinal));
                    ordinal += 1;
                }
                other => self.declare(other),
            }
        }
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
fn top_level_channels<'a>(src: &impl Source<'a>, declared: &mut Declared<'_>) {
    let mut pos = 8usize;
    let mut found = Vec::new();
    while let Ok((op, len)) = header_at(src, pos) {
        if len > (src.len() - pos - 9) as u64 {
            break;
        }
        if op == 0x03 || op == 0x04 {
            if let Ok(r) = src.read(pos + 9, len as usize).map(|body| parse(op, body)) {
                found.extend(r.ok().map(Record::into_owned));
            }
        }
        pos += 9 + len as usize;
    }
    // Every schema first, then the channels that name them.
    let (schemas, channels): (Vec<_>, Vec<_>) = found.into_iter().partition(|r| matches!(r, Record::Schema { .. }));
    for r in schemas.into_iter().chain(channels) {
        declared.declare(r);
    }
}
