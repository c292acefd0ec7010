use std::path::PathBuf;

/// Why a source could not be opened or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The file does not exist or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// libav could not open the input as a media file.
    #[error("{path} is not a readable media file: {reason}")]
    NotMedia {
        /// The file.
        path: PathBuf,
        /// libav's reason.
        reason: String,
    },
    /// The input has no video stream.
    #[error("{path} has no video stream")]
    NoVideo {
        /// The file.
        path: PathBuf,
    },
    /// The video stream has no decoder in this build.
    #[error("{path}: no decoder for codec {codec}")]
    UnsupportedCodec {
        /// The file.
        path: PathBuf,
        /// The codec name.
        codec: String,
    },
    /// The video stream holds no frames.
    #[error("{path}: the video stream holds no frames")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A requested frame index is outside the stream.
    #[error("frame {index} requested but the stream has {frames} frames")]
    FrameIndex {
        /// The requested index.
        index: usize,
        /// Frames in the stream.
        frames: usize,
    },
    /// Decoding failed part-way.
    #[error("decoding {path} failed: {reason}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The decoder stopped before producing every requested frame.
    #[error("{path}: decoding ended before frame {index}")]
    MissingFrame {
        /// The file.
        path: PathBuf,
        /// The first frame that never arrived.
        index: usize,
    },
}
