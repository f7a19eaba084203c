//! # bus-client: the embeddable membus library
//!
//! Applications connect to the broker, publish by loaning buffers inside a shared-memory ring and
//! committing them, and receive zero-copy samples that point into the publisher's ring.
#![forbid(unsafe_code)]
