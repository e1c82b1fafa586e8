//! A client of libfse's guard daemon (gRPC service `fse.v1.Guard`).
//!
//! The daemon streams a local model's tokens only after every guard of the
//! request's policy has passed them, then ends each stream with one [`Verdict`].
//!
//! ```no_run
//! use fse_client::{Client, ConnectOptions, Event, Request};
//! use tokio_stream::StreamExt;
//!
//! # async fn demo() -> Result<(), fse_client::Error> {
//! let client = Client::connect("unix:/tmp/fse.sock", ConnectOptions::new()).await?;
//! let request = Request::prompt("The capital of France is").max_tokens(64).temperature(0.0);
//! let mut generation = client.generate(request).await?;
//! while let Some(event) = generation.next().await {
//!     match event? {
//!         Event::Token(token) if token.index == 9 => generation.cancel(), // ask to stop
//!         Event::Token(token) => print!("{}", token.text),
//!         Event::Verdict(verdict) => println!("\n{:?} after {} tokens", verdict.status, verdict.tokens),
//!         Event::Started(_) => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Errors of every kind (the daemon unreachable, a refused request, a stream cut
//! short) are one [`Error`] carrying the gRPC status code and the message; a
//! policy halt is not an error but a verdict with [`Status::Halted`].
//!
//! A [`Verdict`] displays as the one-line verdict of `fse generate`; with the
//! feature `json` (on by default), `Token::to_json`, `Verdict::to_json` and
//! [`info_json`] give the JSON lines of `docs/protocol.md`.

mod client;
mod error;
mod events;
mod render;
mod request;

/// The generated protobuf messages and client stub of `fse.v1` (built from
/// `proto/fse/v1/fse.proto` at compile time).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("fse.v1");
}

pub use client::{Address, Canceller, Client, ConnectOptions, Generation};
pub use error::{Error, code_name};
pub use events::{Completion, Event, GuardTrip, Health, Started, Status, Token, Verdict};
pub use pb::{Device, Info, Limits, ModelInfo, PolicyInfo};
#[cfg(feature = "json")]
pub use render::info_json;
pub use request::{ChatMessage, Request};
pub use tonic::Code;
