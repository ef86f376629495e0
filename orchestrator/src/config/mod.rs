//! Configuration: graph files and the server's `cascade.toml`, read with spans and compiled into
//! the validated [`model`](crate::model). Every error is reported at once, each with file, line,
//! column, the field at fault and a hint.

mod compile;
mod error;
mod raw;
mod table;

pub use compile::{load, load_graph_files, parse_graph_str};
pub use error::{ConfigError, ConfigErrors, Source, nearest};
