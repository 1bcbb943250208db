//! Video features through the `ffmpeg` program: encoding RGB frames to mp4 (AV1 with
//! libsvtav1 as LeRobot does, else H.264 with libx264; yuv420p, a keyframe every 2 frames as
//! LeRobot sets it, crf 23 where LeRobot uses 30: small robot frames lose less) and
//! decoding an episode's frames back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use super::LeRobotError;

/// `explicit`, else `ffmpeg` on PATH; `Err` says that videos need it.
pub fn find_ffmpeg(explicit: Option<&Path>) -> Result<PathBuf, LeRobotError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(LeRobotError::Video(format!("ffmpeg {}: no such file", p.display())))
        };
    }
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("ffmpeg")).find(|f| f.is_file()));
    found.ok_or_else(|| LeRobotError::Video("ffmpeg was not found on PATH; video features need it (install ffmpeg or name it with --ffmpeg, or use images, the default)".into()))
}

/// An encoder ffmpeg has: its name and LeRobot's codec name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoder {
    /// ffmpeg encoder (`libsvtav1`, `libx264`).
    pub name: &'static str,
    /// Codec as info.json names it (`av1`, `h264`).
    pub codec: &'static str,
}

const ENCODERS: [Encoder; 2] =
    [Encoder { name: "libsvtav1", codec: "av1" }, Encoder { name: "libx264", codec: "h264" }];

/// The first of libsvtav1 and libx264 that `ffmpeg` has.
pub fn pick_encoder(ffmpeg: &Path) -> Result<Encoder, LeRobotError> {
    let out = Command::new(ffmpeg)
        .args(["-hide_banner", "-encoders"])
        .output()
        .map_err(|e| LeRobotError::Video(format!("running {}: {e}", ffmpeg.display())))?;
    let list = String::from_utf8_lossy(&out.stdout);
    ENCODERS.into_iter().find(|e| list.split_whitespace().any(|w| w == e.name)).ok_or_else(|| {
        LeRobotError::Video(format!(
            "{} has neither libsvtav1 nor libx264; expected one of them to encode videos",
            ffmpeg.display()
        ))
    })
}

/// One mp4 being written from raw RGB frames piped to ffmpeg.
pub struct VideoFile {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The mp4.
    pub path: PathBuf,
    log: PathBuf,
    frame_bytes: usize,
    /// Frames written.
    pub frames: usize,
}

impl VideoFile {
    /// Starts ffmpeg writing `path` from `width` x `height` RGB frames at `fps`.
    pub fn create(
        ffmpeg: &Path,
        enc: Encoder,
        path: &Path,
        width: u32,
        height: u32,
        fps: u32,
    ) -> Result<Self, LeRobotError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| LeRobotError::Io { path: dir.to_path_buf(), source })?;
        }
        let log = path.with_extension("ffmpeg.log");
        let err = std::fs::File::create(&log).map_err(|source| LeRobotError::Io { path: log.clone(), source })?;
        let size = format!("{width}x{height}");
        let mut cmd = Command::new(ffmpeg);
        cmd.args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-video_size",
            &size,
            "-framerate",
            &fps.to_string(),
            "-i",
            "-",
        ]);
        cmd.args(["-c:v", enc.name, "-pix_fmt", "yuv420p", "-g", "2", "-crf", "23"]);
        if enc.name == "libsvtav1" {
            cmd.args(["-preset", "12"]);
        }
        cmd.arg(path).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(err);
        let mut child = cmd.spawn().map_err(|e| LeRobotError::Video(format!("starting {}: {e}", ffmpeg.display())))?;
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            path: path.to_path_buf(),
            log,
            frame_bytes: width as usize * height as usize * 3,
            frames: 0,
        })
    }

    /// Appends one RGB frame.
    pub fn push(&mut self, rgb: &[u8]) -> Result<(), LeRobotError> {
        if rgb.len() != self.frame_bytes {
            return Err(LeRobotError::Video(format!(
                "{}: a frame of {} bytes; expected {}",
                self.path.display(),
                rgb.len(),
                self.frame_bytes
            )));
        }
        let w = self
            .stdin
            .as_mut()
            .ok_or_else(|| LeRobotError::Video(format!("{}: already finished", self.path.display())))?;
        if let Err(e) = w.write_all(rgb) {
            return Err(self.failure(&format!("writing a frame: {e}")));
        }
        self.frames += 1;
        Ok(())
    }

    /// Closes the input and waits for ffmpeg; `Err` carries ffmpeg's messages.
    pub fn finish(mut self) -> Result<(), LeRobotError> {
        drop(self.stdin.take());
        match self.child.wait() {
            Ok(s) if s.success() => {
                let _ = std::fs::remove_file(&self.log);
                Ok(())
            }
            Ok(s) => Err(self.failure(&format!("ffmpeg exited with {s}"))),
            Err(e) => Err(self.failure(&format!("waiting for ffmpeg: {e}"))),
        }
    }

    fn failure(&mut self, what: &str) -> LeRobotError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        LeRobotError::Video(format!("encoding {}: {what}: {}", self.path.display(), log.trim()))
    }
}

/// Decodes `frames` RGB frames of `width` x `height` starting at `from_s` seconds of `file`
/// (a video at `fps`), with `ffmpeg`; fewer frames or a decoding error is an `Err` naming the
/// file.
pub fn decode(
    ffmpeg: &Path,
    file: &Path,
    from_s: f64,
    fps: u32,
    frames: usize,
    width: usize,
    height: usize,
) -> Result<Vec<Vec<u8>>, LeRobotError> {
    if !file.is_file() {
        return Err(LeRobotError::Missing {
            path: file.to_path_buf(),
            what: "the video file meta/episodes names".into(),
        });
    }
    // Half a frame early, so that the first frame at from_s is the first one kept.
    let start = (from_s - 0.5 / fps as f64).max(0.0);
    let out = Command::new(ffmpeg)
        .args(["-hide_banner", "-loglevel", "error", "-ss", &format!("{start:.6}")])
        .arg("-i")
        .arg(file)
        .args(["-frames:v", &frames.to_string(), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .map_err(|e| LeRobotError::Video(format!("running {}: {e}", ffmpeg.display())))?;
    if !out.status.success() {
        return Err(LeRobotError::Video(format!(
            "{} does not decode: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let fb = width * height * 3;
    if out.stdout.len() != frames * fb {
        return Err(LeRobotError::Video(format!(
            "{}: {} bytes decoded from {from_s:.3} s ({:.2} frames of {width}x{height}); expected {frames} frames",
            file.display(),
            out.stdout.len(),
            out.stdout.len() as f64 / fb as f64
        )));
    }
    Ok(out.stdout.chunks_exact(fb).map(|c| c.to_vec()).collect())
}
