//! CDR (little-endian XCDR1, as ROS 2 serializes) encoding and decoding of the message types the
//! recorder handles, and their `ros2msg` schema texts for MCAP.
//!
//! Alignment follows the ROS 2 CDR rules: every primitive is aligned to its own size, counted from
//! the first byte after the 4-byte encapsulation header.

use thiserror::Error;

/// Errors decoding a CDR message.
#[derive(Debug, Error, PartialEq)]
pub enum CdrError {
    /// The buffer ended before the field was complete.
    #[error("{type_name}: truncated at byte {offset} while reading `{field}` (need {need} bytes, {have} left)")]
    Truncated {
        /// Message type.
        type_name: &'static str,
        /// Field being read.
        field: &'static str,
        /// Offset in the buffer.
        offset: usize,
        /// Bytes needed.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The encapsulation header is not CDR little- or big-endian.
    #[error("{type_name}: unsupported CDR encapsulation {header:02x?} (expected 00 01 = CDR little-endian)")]
    Encapsulation {
        /// Message type.
        type_name: &'static str,
        /// The first two bytes.
        header: [u8; 2],
    },
    /// A string is not NUL-terminated UTF-8.
    #[error("{type_name}: field `{field}` is not a NUL-terminated UTF-8 string")]
    BadString {
        /// Message type.
        type_name: &'static str,
        /// Field.
        field: &'static str,
    },
    /// The type name is not one this crate decodes.
    #[error("unknown message type `{0}` (expected one of: {list})", list = MsgType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "))]
    UnknownType(String),
}

/// The message types the recorder knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsgType {
    /// `sensor_msgs/msg/Image`.
    Image,
    /// `sensor_msgs/msg/CompressedImage`.
    CompressedImage,
    /// `sensor_msgs/msg/JointState`.
    JointState,
    /// `geometry_msgs/msg/PoseStamped`.
    PoseStamped,
    /// `geometry_msgs/msg/WrenchStamped`.
    WrenchStamped,
    /// `std_msgs/msg/Float32MultiArray`.
    Float32MultiArray,
    /// `vla_finetune_msgs/msg/SensorFrame`.
    SensorFrame,
}

impl MsgType {
    /// Every known type.
    pub const ALL: [MsgType; 7] = [
        MsgType::Image,
        MsgType::CompressedImage,
        MsgType::JointState,
        MsgType::PoseStamped,
        MsgType::WrenchStamped,
        MsgType::Float32MultiArray,
        MsgType::SensorFrame,
    ];

    /// The canonical ROS 2 name (`pkg/msg/Type`).
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Image => "sensor_msgs/msg/Image",
            MsgType::CompressedImage => "sensor_msgs/msg/CompressedImage",
            MsgType::JointState => "sensor_msgs/msg/JointState",
            MsgType::PoseStamped => "geometry_msgs/msg/PoseStamped",
            MsgType::WrenchStamped => "geometry_msgs/msg/WrenchStamped",
            MsgType::Float32MultiArray => "std_msgs/msg/Float32MultiArray",
            MsgType::SensorFrame => "vla_finetune_msgs/msg/SensorFrame",
        }
    }

    /// Parses `pkg/msg/Type` or the short `pkg/Type`.
    pub fn parse(name: &str) -> Result<MsgType, CdrError> {
        let canonical = match name.split('/').collect::<Vec<_>>().as_slice() {
            [pkg, ty] => format!("{pkg}/msg/{ty}"),
            _ => name.to_string(),
        };
        MsgType::ALL.into_iter().find(|t| t.name() == canonical).ok_or_else(|| CdrError::UnknownType(name.to_string()))
    }

    /// The full `ros2msg` schema text (the type's definition followed by every dependency), as
    /// `ros2 bag record` stores it in MCAP.
    pub fn schema_text(self) -> String {
        let (main, deps): (&str, &[(&str, &str)]) = match self {
            MsgType::Image => (IMAGE_MSG, &[HEADER_DEP, TIME_DEP]),
            MsgType::CompressedImage => (COMPRESSED_IMAGE_MSG, &[HEADER_DEP, TIME_DEP]),
            MsgType::JointState => (JOINT_STATE_MSG, &[HEADER_DEP, TIME_DEP]),
            MsgType::PoseStamped => (
                POSE_STAMPED_MSG,
                &[
                    HEADER_DEP,
                    TIME_DEP,
                    ("geometry_msgs/Pose", POSE_MSG),
                    ("geometry_msgs/Point", POINT_MSG),
                    ("geometry_msgs/Quaternion", QUATERNION_MSG),
                ],
            ),
            MsgType::WrenchStamped => (
                WRENCH_STAMPED_MSG,
                &[HEADER_DEP, TIME_DEP, ("geometry_msgs/Wrench", WRENCH_MSG), ("geometry_msgs/Vector3", VECTOR3_MSG)],
            ),
            MsgType::Float32MultiArray => (
                FLOAT32_MULTI_ARRAY_MSG,
                &[
                    ("std_msgs/MultiArrayLayout", MULTI_ARRAY_LAYOUT_MSG),
                    ("std_msgs/MultiArrayDimension", MULTI_ARRAY_DIMENSION_MSG),
                ],
            ),
            MsgType::SensorFrame => (SENSOR_FRAME_MSG, &[HEADER_DEP, TIME_DEP]),
        };
        let mut s = main.to_string();
        for (name, text) in deps {
            s.push_str(&"=".repeat(80));
            s.push_str("\nMSG: ");
            s.push_str(name);
            s.push('\n');
            s.push_str(text);
        }
        s
    }

    /// The header stamp (ns) of an encoded message, or `None` for types without a header.
    pub fn header_stamp(self, cdr: &[u8]) -> Result<Option<i64>, CdrError> {
        if self == MsgType::Float32MultiArray {
            return Ok(None);
        }
        let mut r = Reader::new(cdr, self.name())?;
        Ok(Some(Header::read(&mut r)?.stamp.to_ns()))
    }
}

const HEADER_DEP: (&str, &str) = ("std_msgs/Header", HEADER_MSG);
const TIME_DEP: (&str, &str) = ("builtin_interfaces/Time", TIME_MSG);

/// `vla_finetune_msgs/msg/SensorFrame` definition (the interface package's `SensorFrame.msg`).
pub const SENSOR_FRAME_MSG: &str =
    "# One sample of a multi-channel sensor (e.g. 1 force value + 1025-value OCT A-scan).\n\
std_msgs/Header header\n\
float32[] values\n\
uint32 channels\n\
string layout\n";
const HEADER_MSG: &str = "builtin_interfaces/Time stamp\nstring frame_id\n";
const TIME_MSG: &str = "int32 sec\nuint32 nanosec\n";
const IMAGE_MSG: &str = "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\nuint32 step\nuint8[] data\n";
const COMPRESSED_IMAGE_MSG: &str = "std_msgs/Header header\nstring format\nuint8[] data\n";
const JOINT_STATE_MSG: &str =
    "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort\n";
const POSE_STAMPED_MSG: &str = "std_msgs/Header header\ngeometry_msgs/Pose pose\n";
const POSE_MSG: &str = "geometry_msgs/Point position\ngeometry_msgs/Quaternion orientation\n";
const POINT_MSG: &str = "float64 x\nfloat64 y\nfloat64 z\n";
const QUATERNION_MSG: &str = "float64 x\nfloat64 y\nfloat64 z\nfloat64 w\n";
const WRENCH_STAMPED_MSG: &str = "std_msgs/Header header\ngeometry_msgs/Wrench wrench\n";
const WRENCH_MSG: &str = "geometry_msgs/Vector3 force\ngeometry_msgs/Vector3 torque\n";
const VECTOR3_MSG: &str = "float64 x\nfloat64 y\nfloat64 z\n";
const FLOAT32_MULTI_ARRAY_MSG: &str = "std_msgs/MultiArrayLayout layout\nfloat32[] data\n";
const MULTI_ARRAY_LAYOUT_MSG: &str = "std_msgs/MultiArrayDimension[] dim\nuint32 data_offset\n";
const MULTI_ARRAY_DIMENSION_MSG: &str = "string label\nuint32 size\nuint32 stride\n";

/// `builtin_interfaces/Time`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Time {
    /// Seconds.
    pub sec: i32,
    /// Nanoseconds within the second.
    pub nanosec: u32,
}

impl Time {
    /// From nanoseconds since the epoch (floor division, so `nanosec` is always in range).
    pub fn from_ns(ns: i64) -> Time {
        Time { sec: ns.div_euclid(1_000_000_000) as i32, nanosec: ns.rem_euclid(1_000_000_000) as u32 }
    }
    /// To nanoseconds since the epoch.
    pub fn to_ns(self) -> i64 {
        self.sec as i64 * 1_000_000_000 + self.nanosec as i64
    }
}

/// `std_msgs/Header`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    /// Time the data describes.
    pub stamp: Time,
    /// Coordinate frame.
    pub frame_id: String,
}

impl Header {
    fn write(&self, w: &mut Writer) {
        w.i32(self.stamp.sec);
        w.u32(self.stamp.nanosec);
        w.string(&self.frame_id);
    }
    fn read(r: &mut Reader) -> Result<Header, CdrError> {
        let sec = r.i32("header.stamp.sec")?;
        let nanosec = r.u32("header.stamp.nanosec")?;
        Ok(Header { stamp: Time { sec, nanosec }, frame_id: r.string("header.frame_id")? })
    }
}

/// A message with a CDR encoding.
pub trait RosMessage: Sized {
    /// The message's type.
    const TYPE: MsgType;
    /// Serializes to CDR (with the encapsulation header).
    fn encode(&self) -> Vec<u8>;
    /// Deserializes from CDR.
    fn decode(cdr: &[u8]) -> Result<Self, CdrError>;
}

/// `sensor_msgs/msg/Image`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Image {
    /// Header.
    pub header: Header,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
    /// Pixel encoding (`rgb8`, `bgr8`, `mono8`, `rgba8`, ...).
    pub encoding: String,
    /// Byte order of multi-byte pixels.
    pub is_bigendian: u8,
    /// Bytes per row.
    pub step: u32,
    /// Pixel bytes.
    pub data: Vec<u8>,
}

/// The fields of an [`Image`] without copying its pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageView<'a> {
    /// Header.
    pub header: Header,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
    /// Pixel encoding.
    pub encoding: String,
    /// Bytes per row.
    pub step: u32,
    /// Pixel bytes, borrowed from the message.
    pub data: &'a [u8],
}

impl<'a> ImageView<'a> {
    /// Parses an Image message, borrowing its pixel bytes.
    pub fn parse(cdr: &'a [u8]) -> Result<ImageView<'a>, CdrError> {
        let mut r = Reader::new(cdr, MsgType::Image.name())?;
        let header = Header::read(&mut r)?;
        let height = r.u32("height")?;
        let width = r.u32("width")?;
        let encoding = r.string("encoding")?;
        let _bigendian = r.u8("is_bigendian")?;
        let step = r.u32("step")?;
        let data = r.bytes("data")?;
        Ok(ImageView { header, height, width, encoding, step, data })
    }
}

impl RosMessage for Image {
    const TYPE: MsgType = MsgType::Image;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.data.len());
        self.header.write(&mut w);
        w.u32(self.height);
        w.u32(self.width);
        w.string(&self.encoding);
        w.u8(self.is_bigendian);
        w.u32(self.step);
        w.bytes(&self.data);
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        Ok(Image {
            header,
            height: r.u32("height")?,
            width: r.u32("width")?,
            encoding: r.string("encoding")?,
            is_bigendian: r.u8("is_bigendian")?,
            step: r.u32("step")?,
            data: r.bytes("data")?.to_vec(),
        })
    }
}

/// `sensor_msgs/msg/CompressedImage`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompressedImage {
    /// Header.
    pub header: Header,
    /// `jpeg` or `png` (possibly with a prefix such as `rgb8; jpeg compressed bgr8`).
    pub format: String,
    /// Compressed bytes.
    pub data: Vec<u8>,
}

impl RosMessage for CompressedImage {
    const TYPE: MsgType = MsgType::CompressedImage;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.data.len());
        self.header.write(&mut w);
        w.string(&self.format);
        w.bytes(&self.data);
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        Ok(CompressedImage { header, format: r.string("format")?, data: r.bytes("data")?.to_vec() })
    }
}

/// `sensor_msgs/msg/JointState`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JointState {
    /// Header.
    pub header: Header,
    /// Joint names.
    pub name: Vec<String>,
    /// Positions.
    pub position: Vec<f64>,
    /// Velocities.
    pub velocity: Vec<f64>,
    /// Efforts.
    pub effort: Vec<f64>,
}

impl RosMessage for JointState {
    const TYPE: MsgType = MsgType::JointState;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(128);
        self.header.write(&mut w);
        w.u32(self.name.len() as u32);
        for n in &self.name {
            w.string(n);
        }
        for v in [&self.position, &self.velocity, &self.effort] {
            w.f64_seq(v);
        }
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        let n = r.seq_len("name", 4)?;
        let name = (0..n).map(|_| r.string("name[]")).collect::<Result<_, _>>()?;
        Ok(JointState {
            header,
            name,
            position: r.f64_seq("position")?,
            velocity: r.f64_seq("velocity")?,
            effort: r.f64_seq("effort")?,
        })
    }
}

/// `geometry_msgs/msg/PoseStamped` (position in metres, orientation as a quaternion).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoseStamped {
    /// Header.
    pub header: Header,
    /// `[x, y, z]`.
    pub position: [f64; 3],
    /// `[x, y, z, w]`.
    pub orientation: [f64; 4],
}

impl RosMessage for PoseStamped {
    const TYPE: MsgType = MsgType::PoseStamped;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(96);
        self.header.write(&mut w);
        for v in self.position.iter().chain(self.orientation.iter()) {
            w.f64(*v);
        }
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        let mut position = [0.0; 3];
        for p in &mut position {
            *p = r.f64("pose.position")?;
        }
        let mut orientation = [0.0; 4];
        for q in &mut orientation {
            *q = r.f64("pose.orientation")?;
        }
        Ok(PoseStamped { header, position, orientation })
    }
}

/// `geometry_msgs/msg/WrenchStamped`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrenchStamped {
    /// Header.
    pub header: Header,
    /// Force `[x, y, z]`.
    pub force: [f64; 3],
    /// Torque `[x, y, z]`.
    pub torque: [f64; 3],
}

impl RosMessage for WrenchStamped {
    const TYPE: MsgType = MsgType::WrenchStamped;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(96);
        self.header.write(&mut w);
        for v in self.force.iter().chain(self.torque.iter()) {
            w.f64(*v);
        }
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        let mut v = [0.0; 6];
        for x in &mut v {
            *x = r.f64("wrench")?;
        }
        Ok(WrenchStamped { header, force: [v[0], v[1], v[2]], torque: [v[3], v[4], v[5]] })
    }
}

/// One `std_msgs/MultiArrayDimension`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MultiArrayDimension {
    /// Label.
    pub label: String,
    /// Size of this dimension.
    pub size: u32,
    /// Stride of this dimension.
    pub stride: u32,
}

/// `std_msgs/msg/Float32MultiArray`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Float32MultiArray {
    /// Layout dimensions.
    pub dim: Vec<MultiArrayDimension>,
    /// Offset of the first element.
    pub data_offset: u32,
    /// Values.
    pub data: Vec<f32>,
}

impl RosMessage for Float32MultiArray {
    const TYPE: MsgType = MsgType::Float32MultiArray;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + 4 * self.data.len());
        w.u32(self.dim.len() as u32);
        for d in &self.dim {
            w.string(&d.label);
            w.u32(d.size);
            w.u32(d.stride);
        }
        w.u32(self.data_offset);
        w.f32_seq(&self.data);
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let n = r.seq_len("layout.dim", 9)?;
        let mut dim = Vec::with_capacity(n);
        for _ in 0..n {
            dim.push(MultiArrayDimension {
                label: r.string("layout.dim[].label")?,
                size: r.u32("layout.dim[].size")?,
                stride: r.u32("layout.dim[].stride")?,
            });
        }
        Ok(Float32MultiArray { dim, data_offset: r.u32("layout.data_offset")?, data: r.f32_seq("data")? })
    }
}

/// `vla_finetune_msgs/msg/SensorFrame`: one multi-channel sensor sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorFrame {
    /// Header.
    pub header: Header,
    /// `channels` values.
    pub values: Vec<f32>,
    /// Number of channels.
    pub channels: u32,
    /// Free-form description of the channels (e.g. `force,ascan[1025]`).
    pub layout: String,
}

impl RosMessage for SensorFrame {
    const TYPE: MsgType = MsgType::SensorFrame;
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + 4 * self.values.len() + self.layout.len());
        self.header.write(&mut w);
        w.f32_seq(&self.values);
        w.u32(self.channels);
        w.string(&self.layout);
        w.finish()
    }
    fn decode(cdr: &[u8]) -> Result<Self, CdrError> {
        let mut r = Reader::new(cdr, Self::TYPE.name())?;
        let header = Header::read(&mut r)?;
        Ok(SensorFrame {
            header,
            values: r.f32_seq("values")?,
            channels: r.u32("channels")?,
            layout: r.string("layout")?,
        })
    }
}

/// CDR little-endian writer.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn with_capacity(n: usize) -> Writer {
        let mut buf = Vec::with_capacity(n + 4);
        buf.extend_from_slice(&[0, 1, 0, 0]);
        Writer { buf }
    }
    fn align(&mut self, n: usize) {
        while (self.buf.len() - 4) % n != 0 {
            self.buf.push(0);
        }
    }
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.align(8);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32 + 1);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
    }
    fn f32_seq(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        self.buf.reserve(4 * v.len());
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn f64_seq(&mut self, v: &[f64]) {
        self.u32(v.len() as u32);
        if !v.is_empty() {
            self.align(8);
        }
        for x in v {
            self.buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// CDR reader over a message buffer (little- or big-endian per the encapsulation header).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big_endian: bool,
    type_name: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], type_name: &'static str) -> Result<Reader<'a>, CdrError> {
        if buf.len() < 4 {
            return Err(CdrError::Truncated {
                type_name,
                field: "encapsulation header",
                offset: 0,
                need: 4,
                have: buf.len(),
            });
        }
        let big_endian = match [buf[0], buf[1]] {
            [0, 1] => false,
            [0, 0] => true,
            h => return Err(CdrError::Encapsulation { type_name, header: h }),
        };
        Ok(Reader { buf, pos: 4, big_endian, type_name })
    }
    fn take(&mut self, n: usize, align: usize, field: &'static str) -> Result<&'a [u8], CdrError> {
        let pad = (align - (self.pos - 4) % align) % align;
        let start = self.pos + pad;
        let have = self.buf.len().saturating_sub(start);
        if have < n {
            return Err(CdrError::Truncated { type_name: self.type_name, field, offset: start, need: n, have });
        }
        self.pos = start + n;
        Ok(&self.buf[start..start + n])
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, CdrError> {
        Ok(self.take(1, 1, field)?[0])
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, CdrError> {
        let b: [u8; 4] = self.take(4, 4, field)?.try_into().expect("4 bytes");
        Ok(if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    }
    fn i32(&mut self, field: &'static str) -> Result<i32, CdrError> {
        Ok(self.u32(field)? as i32)
    }
    fn f64(&mut self, field: &'static str) -> Result<f64, CdrError> {
        let b: [u8; 8] = self.take(8, 8, field)?.try_into().expect("8 bytes");
        Ok(if self.big_endian { f64::from_be_bytes(b) } else { f64::from_le_bytes(b) })
    }
    /// Reads a sequence length and checks that at least `len * min_elem` bytes remain.
    fn seq_len(&mut self, field: &'static str, min_elem: usize) -> Result<usize, CdrError> {
        let n = self.u32(field)? as usize;
        let have = self.buf.len() - self.pos;
        if n.saturating_mul(min_elem) > have {
            return Err(CdrError::Truncated {
                type_name: self.type_name,
                field,
                offset: self.pos,
                need: n * min_elem,
                have,
            });
        }
        Ok(n)
    }
    fn string(&mut self, field: &'static str) -> Result<String, CdrError> {
        let n = self.seq_len(field, 1)?;
        if n == 0 {
            return Ok(String::new());
        }
        let b = self.take(n, 1, field)?;
        let bad = || CdrError::BadString { type_name: self.type_name, field };
        let (last, body) = b.split_last().ok_or_else(bad)?;
        if *last != 0 {
            return Err(bad());
        }
        String::from_utf8(body.to_vec()).map_err(|_| bad())
    }
    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], CdrError> {
        let n = self.seq_len(field, 1)?;
        self.take(n, 1, field)
    }
    fn f32_seq(&mut self, field: &'static str) -> Result<Vec<f32>, CdrError> {
        let n = self.seq_len(field, 4)?;
        let big = self.big_endian;
        let b = self.take(4 * n, 4, field)?;
        Ok(b.chunks_exact(4)
            .map(|c| {
                let a: [u8; 4] = c.try_into().expect("4 bytes");
                if big {
                    f32::from_be_bytes(a)
                } else {
                    f32::from_le_bytes(a)
                }
            })
            .collect())
    }
    fn f64_seq(&mut self, field: &'static str) -> Result<Vec<f64>, CdrError> {
        let n = self.seq_len(field, 8)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let big = self.big_endian;
        let b = self.take(8 * n, 8, field)?;
        Ok(b.chunks_exact(8)
            .map(|c| {
                let a: [u8; 8] = c.try_into().expect("8 bytes");
                if big {
                    f64::from_be_bytes(a)
                } else {
                    f64::from_le_bytes(a)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pose_stamped_layout_matches_hand_computed_bytes() {
        let p = PoseStamped {
            header: Header { stamp: Time { sec: 1, nanosec: 2 }, frame_id: "base".into() },
            position: [1.0, 2.0, 3.0],
            orientation: [0.0, 0.0, 0.0, 1.0],
        };
        let b = p.encode();
        // 4 encapsulation + 8 stamp + 4 len + 5 "base\0" = 21, padded to 24 (offset 20 from body start
        // is 8-aligned? body offset 17 -> pad to 24) then 7 doubles.
        assert_eq!(&b[..4], &[0, 1, 0, 0]);
        assert_eq!(&b[4..8], &1i32.to_le_bytes());
        assert_eq!(&b[12..16], &5u32.to_le_bytes());
        assert_eq!(&b[16..21], b"base\0");
        assert_eq!(b.len(), 4 + 24 + 56);
        assert_eq!(&b[28..36], &1.0f64.to_le_bytes());
        assert_eq!(PoseStamped::decode(&b).unwrap(), p);
    }

    #[test]
    fn truncated_message_is_an_error_naming_the_field() {
        let f = SensorFrame { values: vec![1.0; 10], channels: 10, ..Default::default() }.encode();
        let e = SensorFrame::decode(&f[..f.len() - 9]).unwrap_err();
        assert!(matches!(e, CdrError::Truncated { .. }), "{e}");
        assert!(MsgType::parse("foo_msgs/Bar").is_err());
        assert_eq!(MsgType::parse("sensor_msgs/Image").unwrap(), MsgType::Image);
    }
}
