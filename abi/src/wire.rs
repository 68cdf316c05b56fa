//! postcard encoding and decoding with the message-size bound, returning
//! errors (never panicking) on bad input.

use core::fmt;
use serde::{Deserialize, Serialize};

/// The largest encoded message (request or reply), in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// Why bytes did not decode into a message. Append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DecodeError {
    /// The input ended inside a message.
    UnexpectedEnd,
    /// A varint was malformed or too large for its type.
    BadVarint,
    /// A bool byte other than 0 or 1.
    BadBool,
    /// An `Option` tag other than 0 or 1.
    BadOption,
    /// An enum variant index that does not fit the index type.
    BadEnum,
    /// Invalid data: an enum variant index this version does not know, a
    /// sequence longer than its bound, and the like.
    BadEncoding,
    /// This many bytes were left after a complete message.
    TrailingBytes(u32),
    /// The input is longer than [`MAX_MESSAGE`] (its length).
    TooLong(u32),
    /// Any other postcard error.
    Other,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnexpectedEnd => write!(f, "input ended inside a message"),
            DecodeError::BadVarint => write!(f, "malformed varint"),
            DecodeError::BadBool => write!(f, "bool byte is not 0 or 1"),
            DecodeError::BadOption => write!(f, "option tag is not 0 or 1"),
            DecodeError::BadEnum => write!(f, "malformed enum variant index"),
            DecodeError::BadEncoding => write!(
                f,
                "invalid data (unknown variant, list over its bound, ...)"
            ),
            DecodeError::TrailingBytes(n) => write!(f, "{n} bytes after the message"),
            DecodeError::TooLong(n) => write!(f, "{n} bytes is over the {MAX_MESSAGE}-byte bound"),
            DecodeError::Other => write!(f, "undecodable input"),
        }
    }
}

impl From<postcard::Error> for DecodeError {
    fn from(e: postcard::Error) -> Self {
        use postcard::Error as E;
        match e {
            E::DeserializeUnexpectedEnd => DecodeError::UnexpectedEnd,
            E::DeserializeBadVarint => DecodeError::BadVarint,
            E::DeserializeBadBool => DecodeError::BadBool,
            E::DeserializeBadOption => DecodeError::BadOption,
            E::DeserializeBadEnum => DecodeError::BadEnum,
            E::DeserializeBadEncoding | E::SerdeDeCustom => DecodeError::BadEncoding,
            _ => DecodeError::Other,
        }
    }
}

/// Why a message did not encode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncodeError {
    /// The output buffer (of this length) is too small.
    BufferFull(usize),
    /// Any other postcard error.
    Other,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferFull(n) => write!(f, "message does not fit in {n} bytes"),
            EncodeError::Other => write!(f, "message did not encode"),
        }
    }
}

/// Encodes `msg` into `buf`, returning the encoded length.
pub fn encode<T: Serialize>(msg: &T, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let cap = buf.len();
    match postcard::to_slice(msg, buf) {
        Ok(used) => Ok(used.len()),
        Err(postcard::Error::SerializeBufferFull) => Err(EncodeError::BufferFull(cap)),
        Err(_) => Err(EncodeError::Other),
    }
}

/// Decodes exactly one message from `bytes`: input over [`MAX_MESSAGE`],
/// malformed input and trailing bytes are errors.
pub fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(DecodeError::TooLong(
            u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        ));
    }
    let (msg, rest) = postcard::take_from_bytes::<T>(bytes)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len() as u32));
    }
    Ok(msg)
}
