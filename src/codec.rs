//! The protobuf codec of every generated Lanyard and Workload API service: prost, with small
//! initial buffers.
//!
//! tonic's default codec gives every call an 8 KiB encode buffer (and every request body an 8 KiB
//! decode buffer) that lives as long as the call. A CA with 10,000 agents holds two server
//! streams per agent (`Revocation.Watch`, `Ca.WatchBundles`), mostly idle, whose messages are a
//! few hundred bytes: 16 KiB per agent of buffers that are almost never used (issue #16). Decode
//! buffers start at [`INITIAL_BUFFER`] and grow as a message needs. Encode buffers start empty
//! ([`INITIAL_ENCODE_BUFFER`]): a watch stream that has sent nothing holds no buffer at all, and
//! the first message sizes it. The yield threshold stays tonic's.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Initial size of a request body's decode buffer (tonic's default is 8 KiB).
pub const INITIAL_BUFFER: usize = 512;

/// Initial size of a call's encode buffer: none until the first message (tonic's default is
/// 8 KiB). An agent's `Revocation.Watch` usually never sends one; the few reallocations a unary
/// response pays to grow from empty are noise beside its TLS record and signature.
pub const INITIAL_ENCODE_BUFFER: usize = 0;

/// Largest `Revocation.GetCrl` response a Lanyard client decodes (tonic's default limit is
/// 4 MiB). A CRL takes ~36 bytes per live serial revocation, 36 MB at a million, and while a CA
/// rotates the response carries the retiring CA's CRL too; at 4 MiB every client refused the CRL
/// of a CA holding more than ~110,000 revocations. 256 MiB is about 3.5 million entries with a
/// retiring CA's CRL beside them: room to grow, yet a bound on what one response may make a
/// client allocate. Requests stay bounded by the server's own, far smaller, limit.
pub const MAX_CRL_RESPONSE: usize = 256 << 20;

/// Yield to the runtime after this many encoded bytes in one poll (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn decode_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

fn encode_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_ENCODE_BUFFER, YIELD_THRESHOLD)
}

/// A prost [`Codec`] with small initial buffers; named by `build.rs` as the codec of
/// the generated services.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SmallEncoder<T>;
    type Decoder = SmallDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        SmallDecoder(PhantomData)
    }
}

/// Encodes `T` with prost into a buffer that starts empty.
#[derive(Debug, Clone, Copy)]
pub struct SmallEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SmallEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // EncodeBuf grows as needed, so prost's only error (too little room) cannot happen;
        // still, a failure is an error for the caller, never a panic.
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a response: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        encode_settings()
    }
}

/// Decodes `U` with prost from a small initial buffer.
#[derive(Debug, Clone, Copy)]
pub struct SmallDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for SmallDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // Worded as tonic's own codec words it ("failed to decode Protobuf message: …"): the
        // server's status layer recognizes that prefix and answers a malformed request with
        // INVALID_ARGUMENT (api::status::client_faults_keep_their_codes).
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        decode_settings()
    }
}
